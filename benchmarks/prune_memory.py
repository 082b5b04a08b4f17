"""Peak memory of in-memory pruning without recovery, each model in a fresh process.

    python benchmarks/prune_memory.py                 # SmolLM2-135M and a ~1B random-weight Llama
    python benchmarks/prune_memory.py probe MODEL     # one run: prints its figures as JSON

Goal (issue 15): the peak RSS above the process's RSS after its imports <= 1.5 x the model's float32
weights. Writes benchmarks/results/prune_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_mib, rss_mib  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prune_memory.json"
# ~1.1B parameters: TinyLlama-1.1B's shapes with SmolLM2's vocabulary (random weights, float32 on disk)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)


def probe(model: str, calib_samples: int, seq_len: int) -> dict:
    """Prune `model` (KV heads halved, MLP halved, no recovery) in this process; the memory it took."""
    import transformers

    from transact_edge import plan
    from transact_edge.loading import read_config
    from transact_edge.prune import PruneOptions, prune
    from transact_edge.shapes import config_params

    transformers.utils.logging.disable_progress_bar()
    config = read_config(model)
    base = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        report = prune(PruneOptions(model=model, out=Path(tmp) / "out", device="cpu", seq_len=seq_len, batch_size=1,
                                    calib_samples=calib_samples,
                                    widths=plan.WidthRequest(kv_heads=config.num_key_value_heads // 2,
                                                             mlp_ratio=0.5))).to_json()
    fp32 = report["dense"]["params"] * 4 / 2**20
    peak = peak_rss_mib()
    return {"model": model, "params": report["dense"]["params"], "config_params": config_params(config),
            "fp32_weights_mib": fp32, "rss_after_imports_mib": base, "peak_rss_mib": peak,
            "peak_above_imports_over_fp32": (peak - base) / fp32, "seconds": report["seconds"]}


def random_llama(directory: Path) -> Path:
    """A ~1B random-weight Llama saved as float32 safetensors with SmolLM2's tokenizer (once)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transact_edge.loading import load_tokenizer, resolve

    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(directory)
    load_tokenizer(resolve("smollm2-135m")).save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "probe"])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transact-edge-llama-1b")
    a = ap.parse_args()
    if a.what == "probe":
        print(json.dumps(probe(a.model, a.calib_samples, a.seq_len)))
        return
    rows = []
    for model in ("smollm2-135m", str(random_llama(a.work))):
        out = subprocess.run([sys.executable, __file__, "probe", model, "--calib-samples", str(a.calib_samples),
                              "--seq-len", str(a.seq_len)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.splitlines()[-1]))
        print(f"{model}: peak {rows[-1]['peak_rss_mib']:.0f} MiB, {rows[-1]['peak_above_imports_over_fp32']:.2f} x "
              f"the fp32 weights ({rows[-1]['fp32_weights_mib']:.0f} MiB) above the imports", flush=True)
    RESULTS.write_text(json.dumps({"machine": machine(), "goal": 1.5, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
