"""Our `export --imatrix auto` against llama.cpp's own llama-imatrix, on SmolLM2.

Both importance matrices come from the first CALIB chunks of 512 tokens of the shipped calibration
pages: llama-imatrix reads them as text through the F32 GGUF (llama.cpp's tokenizer and arithmetic);
ours runs the PyTorch model with hooks (transact_edge/exporters/imatrix.py). Reported: how far each
entry's mean squared activation differs (relative to the entry's largest, and cosine), then llama.cpp
perplexity (llama-perplexity, windows of 512, on the shipped held-out pages and, with --second-text, a
text of another domain) after llama-quantize with no imatrix, llama-imatrix's and ours, per type.
Goals: ours within 1% of llama-imatrix's perplexity; an imatrix lowers perplexity on both texts.

    python benchmarks/imatrix.py --types Q4_0,Q4_K_M,IQ4_XS,IQ3_XXS --chunks 32 --second-text lee_background.cor
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402
from _common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "imatrix.json"


def entries(path: Path) -> dict[str, np.ndarray]:
    """Entry -> mean squared activation per column (in_sum2 / counts)."""
    import gguf

    t = {x.name: np.array(x.data, dtype=np.float64).ravel() for x in gguf.GGUFReader(path).tensors}
    return {n[:-len(".in_sum2")]: v / t[n[:-len(".in_sum2")] + ".counts"][0] for n, v in t.items()
            if n.endswith(".in_sum2")}


def agreement(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    rel = {n: float(np.abs(ours[n] - ref[n]).max() / np.abs(ref[n]).max()) for n in ref}
    cos = {n: float(ours[n] @ ref[n] / np.linalg.norm(ours[n]) / np.linalg.norm(ref[n])) for n in ref}
    worst = max(rel, key=rel.get)
    return {"entries": len(ref), "same_names": sorted(ours) == sorted(ref),
            "rel_max_median": float(np.median(list(rel.values()))), "rel_max_worst": rel[worst], "worst": worst, "cosine_min": min(cos.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", default="IQ4_XS,Q4_K_M,IQ3_XXS")
    p.add_argument("--calib", type=int, default=64, help="calibration chunks of 512 tokens (both imatrices)")
    p.add_argument("--chunks", type=int, default=32, help="llama-perplexity chunks of 512 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--second-text", type=Path, help="a second held-out text of another domain (lee_background.cor)")
    a = p.parse_args()
    from transact_edge import corpus
    from transact_edge.exporters import imatrix
    from transact_edge.exporters.gguf import GGUFExportOptions, export

    tmp = Path(tempfile.mkdtemp(prefix="imatrix-bench-"))
    f32 = export(GGUFExportOptions(a.model, "f32", tmp / "f32.gguf"))
    calib, held = tmp / "calib.txt", tmp / "eval.txt"
    calib.write_text("\n\n".join(corpus.default_texts("train")))
    held.write_text("\n\n".join(corpus.default_texts("eval")))
    t = time.perf_counter()
    subprocess.run([str(frontier.tool("llama-imatrix")), "-m", str(f32), "-f", str(calib), "-o", str(tmp / "ref.gguf"),
                    "-c", str(imatrix.CHUNK), "--chunks", str(a.calib), "--no-ppl", "-t", str(a.threads)],
                   check=True, capture_output=True)
    seconds = {"llama-imatrix": time.perf_counter() - t}
    t = time.perf_counter()
    imatrix.auto(a.model, f32, tmp / "ours.gguf", a.calib)
    seconds["auto (torch)"] = time.perf_counter() - t
    row = {"machine": machine(), "model": a.model, "calib_chunks": a.calib, "ppl_chunks": a.chunks,
           "seconds": seconds, "agreement": agreement(entries(tmp / "ours.gguf"), entries(tmp / "ref.gguf")),
           "ppl": {}}
    texts = {"wiki": held} | ({"news": a.second_text} if a.second_text else {})
    for qtype in a.types.split(","):
        for name, matrix in (("none", None), ("llama-imatrix", tmp / "ref.gguf"), ("auto", tmp / "ours.gguf")):
            if matrix is None and qtype.lower() in ("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m"):
                continue  # llama-quantize refuses these without an imatrix
            out = tmp / f"{qtype}-{name}.gguf"
            subprocess.run([str(frontier.tool("llama-quantize")), *(["--imatrix", str(matrix)] if matrix else []),
                            str(f32), str(out), qtype], check=True, capture_output=True)
            for text, path in texts.items():
                row["ppl"][f"{qtype} {name} {text}"] = frontier.perplexity(out, path, a)
            out.unlink()
        for text in texts:
            ref, ours = row["ppl"][f"{qtype} llama-imatrix {text}"], row["ppl"][f"{qtype} auto {text}"]
            row.setdefault("auto_vs_llama_imatrix_pct", {})[f"{qtype} {text}"] = 100 * (ours - ref) / ref
        print(qtype, {k: round(v, 3) for k, v in row["ppl"].items() if k.startswith(qtype)}, flush=True)
        RESULTS.write_text(json.dumps(row, indent=1) + "\n")  # after each type: a run cut short keeps what it measured
    row["ppl"] |= {f"F32 {text}": frontier.perplexity(f32, path, a) for text, path in texts.items()}
    RESULTS.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
