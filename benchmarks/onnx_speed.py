"""ONNX export cost, quality and speed per weight type (fp32 / int8 / int4), dense vs TransAct-pruned.

    python benchmarks/onnx_speed.py smollm2-135m transact-demo --types fp32,int8,int4

For each checkpoint and type: export wall time and size (the directory onnxruntime-genai reads),
perplexity by onnxruntime on the shipped held-out pages (window 512, the first --ppl-tokens tokens),
onnxruntime prompt processing (one prefill of -p tokens) and generation (-n greedy tokens with the KV
cache), and onnxruntime-genai generation, in tokens/s, mean ± sd over -r runs. Writes
benchmarks/results/onnx_speed.json and onnx_speed.md.
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
from transact_edge.evaluate import perplexity  # noqa: E402
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


def genai_tg(directory: Path, prompt: np.ndarray, n: int) -> float:
    """onnxruntime-genai's greedy decode speed after a prompt, as an app would run it."""
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.size + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt.astype(np.int32))
    start = time.perf_counter()
    for _ in range(n):
        gen.generate_next_token()
    return n / (time.perf_counter() - start)


def measure(ckpt: str, kind: str, tmp: Path, a) -> dict:
    quantize, _, algo = kind.partition("-")  # int4-rtn: int4 through round-to-nearest
    quantize = None if quantize in ("fp32", "fp16") else quantize
    start = time.perf_counter()
    graph = export(ONNXExportOptions(ckpt, tmp / f"{Path(ckpt).name}-{kind}", quantize=quantize,
                                     int4_algo=algo or "hqq"))
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in graph.parent.glob("model.onnx*"))
    tok = load(ckpt).tokenizer
    ids = corpus.stream(tok, "wiki", "eval")
    model = OrtModel(graph)
    ppl = perplexity(model.logits, ids, 512, max_tokens=a.ppl_tokens, batch_size=1, text="shipped held-out pages").ppl
    prompt = ids[: a.p].numpy()
    bench(model, prompt[:16], 2)  # warm-up
    runs = [bench(model, prompt, a.n) for _ in range(a.r)]
    genai = [genai_tg(graph.parent, prompt, a.n) for _ in range(a.r)]
    pp, tg = [r[0] for r in runs], [r[1] for r in runs]
    row = {"model": ckpt, "type": kind, "export_seconds": seconds, "bytes": size, "ppl": ppl,
           "ppl_tokens": a.ppl_tokens, f"pp{a.p}": [statistics.mean(pp), statistics.pstdev(pp)],
           f"tg{a.n}": [statistics.mean(tg), statistics.pstdev(tg)],
           f"genai_tg{a.n}": [statistics.mean(genai), statistics.pstdev(genai)]}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], a) -> str:
    lines = ["| model | type | MiB | ppl (vs fp32) | onnxruntime pp{p} t/s | onnxruntime tg{n} t/s | genai tg{n} t/s |"
             .format(p=a.p, n=a.n), "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = next(x["ppl"] for x in rows if x["model"] == r["model"] and x["type"] == "fp32")
        pp, tg, gt = r[f"pp{a.p}"], r[f"tg{a.n}"], r[f"genai_tg{a.n}"]
        lines.append(f"| {r['model']} | {r['type']} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.2f} ({100 * (r['ppl'] / ref - 1):+.1f}%) "
                     f"| {pp[0]:.1f} ± {pp[1]:.1f} | {tg[0]:.1f} ± {tg[1]:.1f} | {gt[0]:.1f} ± {gt[1]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--types", type=lambda v: v.split(","), default=["fp32", "int8", "int4", "int4-rtn"])
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_speed.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(ckpt, kind, Path(tmp), a) for ckpt in a.checkpoints for kind in a.types]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    a.out.with_suffix(".md").write_text(table(rows, a))
    print(table(rows, a))


if __name__ == "__main__":
    main()
