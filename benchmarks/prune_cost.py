"""What pruning costs: salience-pass throughput against a plain forward, peak memory, time per stage.

    python benchmarks/prune_cost.py --calib-samples 16 --seq-len 512

Goals (issue 2): salience tokens/s >= 50% of a plain forward of the same model on the same
batches; peak RSS <= 1.5 x the fp32 model size. Writes benchmarks/results/prune_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from _common import machine, peak_rss_mib, rss_mib  # noqa: E402
from transact_edge import corpus, plan  # noqa: E402
from transact_edge.calibration import collect  # noqa: E402
from transact_edge.loading import load  # noqa: E402
from transact_edge.prune import PruneOptions, prune  # noqa: E402


@torch.inference_mode()
def plain_forward(model, windows, batch_size) -> float:
    start = time.perf_counter()
    for batch in windows.split(batch_size):
        model.model(input_ids=batch, use_cache=False)
    return windows.numel() / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prune_cost.json")
    a = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()

    rss_imports = rss_mib()
    loaded = load(a.model)
    model = loaded.model
    fp32_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    windows = corpus.windows(corpus.stream(loaded.tokenizer), a.seq_len, a.calib_samples)
    plain_forward(model, windows[: a.batch_size], a.batch_size)  # warm-up

    rows = []
    for _ in range(a.repeats):  # interleaved so that machine noise hits both alike
        fwd = plain_forward(model, windows, a.batch_size)
        t = time.perf_counter()
        collect(model, windows, a.batch_size)
        sal = windows.numel() / (time.perf_counter() - t)
        rows.append({"forward_tok_s": fwd, "salience_tok_s": sal, "ratio": sal / fwd})
    del model, loaded

    with tempfile.TemporaryDirectory() as tmp:
        report = prune(PruneOptions(model=a.model, out=Path(tmp) / "out", widths=plan.WidthRequest(kv_heads=2, mlp_ratio=0.5),
                                    calib_samples=a.calib_samples, seq_len=a.seq_len,
                                    batch_size=a.batch_size)).to_json()
    result = {
        "machine": machine(),
        "model": a.model, "calibration": {"windows": a.calib_samples, "seq_len": a.seq_len, "batch_size": a.batch_size},
        "throughput": rows,
        "ratio_median": sorted(r["ratio"] for r in rows)[len(rows) // 2],
        "fp32_model_mib": fp32_mib,
        "rss_after_imports_mib": rss_imports,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_over_model": peak_rss_mib() / fp32_mib,
        "peak_rss_above_imports_over_model": (peak_rss_mib() - rss_imports) / fp32_mib,
        "stage_seconds": report["seconds"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"salience/forward throughput ratio: median {result['ratio_median']:.2f} "
          f"({', '.join('%.0f/%.0f' % (r['salience_tok_s'], r['forward_tok_s']) for r in rows)} tok/s)")
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB = {result['peak_rss_over_model']:.2f} x fp32 model "
          f"({fp32_mib:.0f} MiB); above the {rss_imports:.0f} MiB of imports: {result['peak_rss_above_imports_over_model']:.2f} x")
    print("stage seconds:", {k: round(v, 2) for k, v in report["seconds"].items()})


if __name__ == "__main__":
    main()
