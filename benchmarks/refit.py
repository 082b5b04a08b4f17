"""The refit at the cut (issue 21, `prune --reconstruct`): none vs refit, one shot, no training, on
SmolLM2-135M at the frontier's ~75% and ~50% widths, scored by llama.cpp at Q8_0.

A plain point prunes with prune() (salience on 16 x 512 calibration tokens of the shipped training
pages); its refit twin replays that plan with --reconstruct on 64 x 512 = 32K calibration tokens (as the
issue's probe), so both keep the same heads and channels and differ only by the refit. Each exports Q8_0
GGUF with our exporter (`export --outtype q8_0`) and is scored with the built llama-perplexity (-c 512,
the first --chunks chunks, as benchmarks/frontier.py) on the shipped held-out pages (`wiki`) and on the
Lee news corpus (`news`, gensim's lee_background.cor). benchmarks/results/refit.json is rewritten after
every point; --prune-only makes the checkpoints under --work first (a later run reuses them).

    nice -n 19 python benchmarks/refit.py --second-text lee_background.cor --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402
from _common import machine  # noqa: E402

WIDTHS = {"tx75": frontier.WIDTHS["tx75"], "tx50": frontier.WIDTHS["tx50"]}
CALIB = dict(calib_samples=64, seq_len=512, batch_size=8)  # the refit's calibration: 32K tokens, as the probe's
CUT_WINDOWS = 16  # windows of 512 tokens that score the cut both points share (this 2-core VM is slow)


def pruned(name: str, widths: str, reconstruct: bool, a) -> dict:
    """The point's checkpoint under --work (made now unless a finished one is there) and what its run recorded."""
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions, prune

    out = a.work / name
    if not (out / "transact.json").is_file():  # the refit replays the plain cut's plan: the same heads and channels
        chosen = (dict(plan=str(a.work / f"{widths}-none")) if reconstruct
                  else dict(widths=WidthRequest(**WIDTHS[widths]), calib_samples=CUT_WINDOWS))
        prune(PruneOptions(model=a.model, out=out, reconstruct=reconstruct, seed=0, force=True, **(CALIB | chosen)))
    report = json.loads((out / "transact.json").read_text())
    row = {"params": report["pruned"]["params"], "seconds_prune": sum(report["seconds"].values())}
    if reconstruct:
        layers = report["shots"][0]["refit"]["layers"]
        row["seconds_refit"] = report["shots"][0]["refit"]["seconds"]
        row["ridge"] = {m: [layer[m]["ridge"] for layer in layers] for m in ("o_proj", "down_proj")}
    return row


def point(name: str, widths: str, reconstruct: bool, a, files: dict[str, Path]) -> dict:
    """Prune, export Q8_0, score both texts with llama-perplexity."""
    from transact_edge.exporters.gguf import GGUFExportOptions, export

    row = {"point": name, "widths": WIDTHS[widths], "refit": reconstruct} | pruned(name, widths, reconstruct, a)
    gguf = export(GGUFExportOptions(str(a.work / name), "q8_0", a.work / f"{name}-q8_0.gguf"))
    row |= {"bytes": gguf.stat().st_size} | {f"ppl_{k}": frontier.perplexity(gguf, f, a) for k, f in files.items()}
    print(json.dumps({k: v for k, v in row.items() if k != "ridge"}), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--second-text", type=Path, required=True, help="the Lee news corpus (gensim's lee_background.cor)")
    p.add_argument("--chunks", type=int, default=64, help="llama-perplexity chunks of 512 tokens per text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="refit-")))
    p.add_argument("--results", type=Path, default=frontier.RESULTS / "refit.json")
    p.add_argument("--prune-only", action="store_true", help="only make the pruned checkpoints under --work")
    p.add_argument("--widths", type=lambda v: v.split(","), default=list(WIDTHS), help="tx75,tx50")
    a = p.parse_args()
    a.points = [(f"{w}-{'refit' if r else 'none'}", w, r) for w in a.widths for r in (False, True)]
    if a.prune_only:
        for name, widths, reconstruct in a.points:
            print(json.dumps(pruned(name, widths, reconstruct, a)), flush=True)
        return
    files = frontier.texts(a)
    info = machine()
    rows = []
    for name, widths, reconstruct in a.points:
        rows.append(point(name, widths, reconstruct, a, files))
        by = {r["point"]: r for r in rows}
        wins = {f"{w}/{t}": by[f"{w}-refit"][f"ppl_{t}"] < by[f"{w}-none"][f"ppl_{t}"]
                for w in WIDTHS for t in files if f"{w}-refit" in by and f"{w}-none" in by}
        result = {"machine": info, "calibration": {"refit": CALIB, "cut_windows": CUT_WINDOWS}, "chunks": a.chunks,
                  "outtype": "q8_0", "rows": rows, "refit_lowers_perplexity": wins,
                  "goal_met": len(wins) == 2 * len(WIDTHS) and all(wins.values())}
        a.results.write_text(json.dumps(result, indent=1))  # after every point: a cut-off run keeps what it scored
    print(json.dumps({"refit_lowers_perplexity": wins, "goal_met": result["goal_met"]}), flush=True)


if __name__ == "__main__":
    main()
