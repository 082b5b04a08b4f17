"""Layer-streamed pruning of a LLaMA-2-7B-shaped bf16 checkpoint: does it fit a 24 GiB machine?

    python benchmarks/stream_7b.py [--work DIR] [--calib-samples 4] [--seq-len 512]

Writes (once) a random-weight checkpoint with LLaMA-2-7B's shapes (hidden 4096, 32 layers, 32
heads, MLP 11008; the SmolLM2 tokenizer, so vocab 49152 instead of 32000: 6.9B parameters, 13.9 GB
in bf16) as safetensors shards, then runs `transact-edge prune --stream` on it in its own process
(half the KV heads and MLP channels) and records that process's peak RSS (VmHWM) and wall time.
Random weights: this measures memory and time, not quality. Writes benchmarks/results/stream_7b.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from transact_edge.devices import Local  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             num_hidden_layers=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def make_checkpoint(path: Path) -> int:
    """Random bf16 weights, one shard per layer, written without ever holding more than a layer."""
    from transformers import AutoTokenizer, LlamaConfig

    from transact_edge.loading import resolve

    if (path / "config.json").is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    path.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    config = LlamaConfig(**SHAPE, vocab_size=len(tok), torch_dtype="bfloat16")
    h, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    index = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, path / name, metadata={"format": "pt"})
        index.update({k: name for k in tensors})

    shard("model-embed.safetensors", {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
                                      "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for il in range(n):
        p = f"model.layers.{il}"
        shard(f"model-layer{il:02d}.safetensors", {
            f"{p}.self_attn.q_proj.weight": rand(h, h), f"{p}.self_attn.k_proj.weight": rand(h, h),
            f"{p}.self_attn.v_proj.weight": rand(h, h), f"{p}.self_attn.o_proj.weight": rand(h, h),
            f"{p}.mlp.gate_proj.weight": rand(f, h), f"{p}.mlp.up_proj.weight": rand(f, h),
            f"{p}.mlp.down_proj.weight": rand(h, f),
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
        print(f"wrote layer {il + 1}/{n}", file=sys.stderr, flush=True)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "transact_edge" / "llama2-7b-random")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stream_7b.json")
    a = ap.parse_args()
    start = time.time()
    size = make_checkpoint(a.work / "dense")
    made = time.time() - start
    cmd = [sys.executable, "-m", "transact_edge", "prune", "--model", str(a.work / "dense"), "--stream",
           "--kv-heads", "16", "--mlp-ratio", "0.5", "--calib-samples", str(a.calib_samples),
           "--seq-len", str(a.seq_len), "--batch-size", "1", "--out", str(a.work / "pruned"), "--force"]
    t = time.time()
    res = Local().run(cmd)
    if res.rc:
        sys.exit(f"prune --stream failed:\n{res.stderr[-2000:]}")
    report = json.loads((a.work / "pruned" / "transact.json").read_text())
    result = {"machine": machine(), "checkpoint_bytes": size, "checkpoint_gib": size / 2**30,
              "make_seconds": made, "prune_seconds": time.time() - t, "peak_rss_mib": res.peak_rss_mib,
              "peak_rss_gib": res.peak_rss_mib / 1024, "command": " ".join(cmd[1:]),
              "calibration": report["calibration"], "pruned_layers": report["pruned"]["layers"][:1],
              "pruned_bytes": sum(f.stat().st_size for f in (a.work / "pruned").glob("*.safetensors"))}
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
