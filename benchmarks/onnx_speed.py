"""ONNX export cost and onnxruntime speed, dense vs TransAct-pruned.

    python benchmarks/onnx_speed.py smollm2-135m transact-demo

For each checkpoint: export wall time and file size, then onnxruntime prompt processing (one
prefill of -p tokens) and generation (-n greedy tokens with the KV cache) in tokens/s, mean ± sd
over -r runs. Writes benchmarks/results/onnx_speed.json (rows for the device benchmark's tables).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

from _common import machine  # noqa: E402
from transact_edge import corpus  # noqa: E402
from transact_edge.exporters.onnx import ONNXExportOptions, export  # noqa: E402
from transact_edge.loading import load  # noqa: E402
from transact_edge.ortruntime import OrtModel  # noqa: E402


def bench(model: OrtModel, prompt: np.ndarray, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    logits, past = model.forward(prompt[None], model.empty_past(1))
    pp = prompt.size / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        logits, past = model.forward(logits[:, -1:].argmax(-1), past)
    return pp, n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_speed.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in a.checkpoints:
            out = Path(tmp) / f"{Path(ckpt).name}.onnx"
            start = time.perf_counter()
            export(ONNXExportOptions(ckpt, out))
            seconds = time.perf_counter() - start
            size = sum(f.stat().st_size for f in Path(tmp).glob(out.name + "*"))
            tok = load(ckpt).tokenizer
            prompt = corpus.stream(tok, "wiki", "eval")[: a.p].numpy()
            model = OrtModel(out)
            bench(model, prompt[:16], 2)  # warm-up
            runs = [bench(model, prompt, a.n) for _ in range(a.r)]
            pp, tg = [r[0] for r in runs], [r[1] for r in runs]
            rows.append({"model": ckpt, "runtime": "onnxruntime", "export_seconds": seconds, "bytes": size,
                         f"pp{a.p}": [statistics.mean(pp), statistics.pstdev(pp)],
                         f"tg{a.n}": [statistics.mean(tg), statistics.pstdev(tg)]})
            print(f"{ckpt}: export {seconds:.0f} s, {size / 2**20:.0f} MiB, pp{a.p} {statistics.mean(pp):.1f} ± "
                  f"{statistics.pstdev(pp):.1f} t/s, tg{a.n} {statistics.mean(tg):.1f} ± {statistics.pstdev(tg):.1f} t/s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
