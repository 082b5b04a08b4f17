"""GPU scale (issue 7): salience and recovery-training throughput and MFU, LLaMA-2-7B shapes, one GPU.

    python benchmarks/gpu_scale.py [--layers 32] [--seq-len 2048] [--batch 4] [--steps 8]

Random weights (throughput only) with LLaMA-2-7B's shapes (hidden 4096, 32 heads, MLP 11008, vocab
32000), in bf16 on the GPU. Salience = the project's calibration.collect (forward with the float64
hooks on every layer's transitional activations); training = recovery.train (AdamW, bf16 autocast,
gradient clipping, cosine schedule) on the bf16 weights. Each is run once untimed, then timed.
MFU = 6 x parameters x training tokens/s / the GPU's dense bf16 peak (H200/H100 SXM: 989 TFLOP/s);
the salience pass is reported against 2 x parameters. Writes benchmarks/results/gpu_scale.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from transact_edge.calibration import collect  # noqa: E402
from transact_edge.recovery import train  # noqa: E402

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_scale.json")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=a.layers)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (a.batch * a.steps, a.seq_len))

    collect(model, ids[: a.batch], a.batch)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    collect(model, ids, a.batch)
    torch.cuda.synchronize()
    salience_tps = ids.numel() / (time.perf_counter() - t)

    train(model, ids[: 2 * a.batch], a.batch, lr=1e-5, seed=0)  # warm-up (and the optimizer's first allocations)
    torch.cuda.synchronize()
    t = time.perf_counter()
    rec = train(model, ids, a.batch, lr=1e-5, seed=0)
    torch.cuda.synchronize()
    train_tps = ids.numel() / (time.perf_counter() - t)
    result = {"machine": machine(), "gpu": name, "shape": "LLaMA-2-7B", "layers": a.layers, "params": params,
              "seq_len": a.seq_len, "batch": a.batch, "steps": a.steps, "dtype": "bfloat16",
              "salience_tokens_per_s": salience_tps, "train_tokens_per_s": train_tps,
              "train_loss_last": rec["loss_last"], "peak_flops_bf16": peak,
              "salience_flops_utilization": 2 * params * salience_tps / peak if peak else None,
              "mfu": 6 * params * train_tps / peak if peak else None,
              "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
              "command": "python benchmarks/gpu_scale.py " + " ".join(sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
