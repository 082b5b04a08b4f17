"""GPU scale (issue 7): salience and recovery-training throughput and MFU, LLaMA-2-7B shapes.

    python benchmarks/gpu_scale.py [--layers 32] [--seq-len 2048] [--batch 4] [--steps 8]
    python benchmarks/gpu_scale.py --scaling 2 [--sharding ddp,fsdp]   # 1 GPU, then 2 GPUs per sharding

Random weights (throughput only) with LLaMA-2-7B's shapes (hidden 4096, 32 heads, MLP 11008, vocab
32000), in bf16 on the GPU. Salience = the project's calibration.collect (forward with the float64
hooks on every layer's transitional activations); training = recovery.train (AdamW, bf16 autocast,
gradient clipping, cosine schedule) on the bf16 weights. Each is run once untimed, then timed.
MFU = 6 x parameters x training tokens/s / the GPU's dense bf16 peak (H200/H100 SXM: 989 TFLOP/s);
the salience pass is reported against 2 x parameters. Writes benchmarks/results/gpu_scale.json.

--scaling N runs this script once on one GPU and then, under torchrun, on N GPUs for each sharding
(transact_edge.distributed: DDP, or FSDP2 per decoder layer), each process with the same per-GPU
batch and steps; scaling efficiency = tokens/s on N GPUs / (N x tokens/s on one), both measured in
the same call on the same machine. Writes benchmarks/results/gpu_scale_multi.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from transact_edge import distributed  # noqa: E402
from transact_edge.calibration import collect  # noqa: E402
from transact_edge.distill import LossOptions  # noqa: E402
from transact_edge.recovery import RecoveryOptions, train  # noqa: E402
from transact_edge.traindata import from_windows  # noqa: E402

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="windows per step per GPU")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sharding", default="ddp", help="with --scaling: comma-separated ddp,fsdp")
    ap.add_argument("--scaling", type=int, metavar="N", help="compare 1 GPU with N GPUs")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.scaling:
        return scaling(a)
    result = measure(a)
    if result is None:  # not process 0
        return
    out = a.out or Path(__file__).parent / "results" / "gpu_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


def measure(a) -> dict | None:
    """One configuration in this process (one of several under torchrun); process 0 returns the result."""
    from transformers import LlamaConfig, LlamaForCausalLM

    group = distributed.join("cuda")
    world = group.world if group else 1
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=a.layers)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(group.device if group else "cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (a.batch * a.steps * world, a.seq_len),
                        generator=torch.Generator().manual_seed(0))  # each process trains on its share

    collect(model, ids[: a.batch * world], a.batch, group=group)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    collect(model, ids, a.batch, group=group)
    torch.cuda.synchronize()
    salience_tps = ids.numel() / (time.perf_counter() - t)

    sharding = a.sharding if group else None
    warm = ids[: 2 * a.batch * world]
    opts = RecoveryOptions(LossOptions("lm"), a.batch, lr=1e-5)
    model, _ = train(model, from_windows(warm), 2, opts, group=group, sharding=sharding or "ddp")  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    model, rec = train(model, from_windows(ids), ids.shape[0] // (a.batch * world), opts, group=group,
                       sharding=sharding or "ddp")
    torch.cuda.synchronize()
    train_tps = ids.numel() / (time.perf_counter() - t)
    memory = torch.cuda.max_memory_allocated() / 2**30
    distributed.leave()
    if group and not group.main:
        return None
    return {"machine": machine(), "gpu": name, "gpus": world, "sharding": sharding, "shape": "LLaMA-2-7B",
            "layers": a.layers, "params": params, "seq_len": a.seq_len, "batch_per_gpu": a.batch, "steps": a.steps,
            "dtype": "bfloat16", "salience_tokens_per_s": salience_tps, "train_tokens_per_s": train_tps,
            "train_loss_last": rec["loss_last"], "peak_flops_bf16": peak,
            "salience_flops_utilization": 2 * params * salience_tps / (world * peak) if peak else None,
            "mfu": 6 * params * train_tps / (world * peak) if peak else None,
            "max_memory_allocated_gib_gpu0": memory,
            "command": "python benchmarks/gpu_scale.py " + " ".join(sys.argv[1:])}


def scaling(a) -> None:
    """1 GPU, then a.scaling GPUs for each sharding, each in its own processes; efficiency from the ratio."""
    common = ["--layers", str(a.layers), "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--steps", str(a.steps)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        plans = [(1, "ddp")] + [(a.scaling, s) for s in a.sharding.split(",")]
        for i, (n, sharding) in enumerate(plans):
            out = Path(tmp) / f"{i}.json"
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            cmd = [*(launch if n > 1 else [sys.executable]), __file__, *common, "--sharding", sharding, "--out", str(out)]
            subprocess.run(cmd, check=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
            runs.append(json.loads(out.read_text()))
    base = runs[0]["train_tokens_per_s"]
    for r in runs[1:]:
        r["scaling_efficiency"] = r["train_tokens_per_s"] / (r["gpus"] * base)
        r["salience_scaling_efficiency"] = r["salience_tokens_per_s"] / (r["gpus"] * runs[0]["salience_tokens_per_s"])
    result = {"machine": machine(), "runs": runs,
              "command": "python benchmarks/gpu_scale.py " + " ".join(sys.argv[1:])}
    out = a.out or Path(__file__).parent / "results" / "gpu_scale_multi.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for r in runs:
        print(f"{r['gpus']} GPU {r['sharding'] or '-':5} train {r['train_tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:.1%}  "
              f"salience {r['salience_tokens_per_s']:9.0f} tok/s  efficiency {r.get('scaling_efficiency', 1):.1%}  "
              f"{r['max_memory_allocated_gib_gpu0']:.1f} GiB")


if __name__ == "__main__":
    main()
