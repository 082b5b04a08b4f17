"""What one calibration pass costs the pruned model's quantization (issue 21 part 2): `prune --imatrix`
ranks the cut by the dense model's importance matrix and hands on that matrix cut to the kept columns
(approximate: the dense model's inputs); against `export --imatrix auto`, a fresh pass of the pruned model.

Both quantize the same pruned model (SmolLM2 at the tx75 and tx50 widths, one shot, no training) with
llama-quantize; llama-perplexity scores each file (-c 512, first --chunks chunks) on the shipped
held-out pages and, with --second-text, a text of another domain.

    python benchmarks/imatrix_cut.py --types Q4_0,IQ4_XS --second-text lee_background.cor
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402
from _common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "imatrix_cut.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", default="Q4_0,IQ4_XS")
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--second-text", type=Path)
    a = p.parse_args()
    from transact_edge import corpus
    from transact_edge.exporters import imatrix
    from transact_edge.exporters.gguf import GGUFExportOptions, export
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions, prune

    tmp = Path(tempfile.mkdtemp(prefix="imatrix-cut-"))
    held = tmp / "eval.txt"
    held.write_text("\n\n".join(corpus.default_texts("eval")))
    texts = {"wiki": held} | ({"news": a.second_text} if a.second_text else {})
    dense = tmp / "dense-imatrix.gguf"
    imatrix.auto(a.model, export(GGUFExportOptions(a.model, "f32", tmp / "dense-f32.gguf")), dense)
    rows = []
    for name, widths in (("tx75", frontier.WIDTHS["tx75"]), ("tx50", frontier.WIDTHS["tx50"])):
        out = tmp / name
        prune(PruneOptions(model=a.model, out=out, widths=WidthRequest(**widths), imatrix=str(dense), seed=0))
        f32 = export(GGUFExportOptions(str(out), "f32", tmp / f"{name}-f32.gguf"))
        fresh = tmp / f"{name}-auto.gguf"
        imatrix.auto(str(out), f32, fresh)
        for qtype in a.types.split(","):
            row = {"widths": name, "type": qtype}
            for label, matrix in (("cut", out / "imatrix.gguf"), ("auto", fresh)):
                gguf = tmp / f"{name}-{qtype}-{label}.gguf"
                subprocess.run([str(frontier.tool("llama-quantize")), "--imatrix", str(matrix), str(f32), str(gguf),
                                qtype], check=True, capture_output=True)
                row |= {f"{label} {k}": frontier.perplexity(gguf, f, a) for k, f in texts.items()}
            row |= {f"cut_vs_auto_pct {k}": 100 * (row[f"cut {k}"] / row[f"auto {k}"] - 1) for k in texts}
            print(json.dumps(row), flush=True)
            rows.append(row)
            RESULTS.write_text(json.dumps({"machine": machine(), "chunks": a.chunks, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
