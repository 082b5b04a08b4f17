"""The frontier at a size people deploy (issue 23): Qwen2.5-Coder-1.5B-Instruct, whose rows (1536, 8960)
K-quants and i-quants fit, on this CPU, without recovery training.

    bash benchmarks/qwen15.sh                          # installs the model's 22 packages, then `cost`, `run`
    python benchmarks/frontier_qwen15.py cost          # what one file costs here: sizes the grid
    python benchmarks/frontier_qwen15.py run --chunks 4 [--commit] [--only dense]
    python benchmarks/frontier_qwen15.py speed         # decode tok/s of every file made, one llama-bench run
    python benchmarks/frontier_qwen15.py report        # frontier-qwen15.md + .png, the fronts marked

The embedded model is a Q4_K_M GGUF (`qwen2.5-coder-1.5b`): every dense row is made by llama-quantize
from its F16 export, so rows above Q4_K_M re-quantize Q4_K_M weights and cannot beat the source.
Each row (point x type) is scored by llama-perplexity (-c 512, the first --chunks chunks, flash
attention on) on the shipped held-out pages and on a code text no calibration sees (modules of
Python's own standard library), and by llama.cpp's own memory report at a 4,096-token context with
an F16 and a Q8_0 KV cache (weights + KV + compute buffers). Rows are appended as they are measured
(benchmarks/results/frontier-qwen15.jsonl); a row already there is skipped, so the run resumes.
One calibration pass for the whole grid: `export --imatrix auto`'s (64 x 512 tokens of the shipped pages) on
the dense model. It quantizes the dense rows, ranks every TransAct cut (`prune --imatrix`: its attn_output
and ffn_down sums are TransAct's statistic) and, cut to the kept columns, quantizes the pruned rows
(approximate: the dense model's inputs). The refit (`-rc` points) makes its own pass for its Gram
matrices (32 x 1024 tokens). Depth points drop the layers block influence picks (their own pass).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402
from _common import machine  # noqa: E402

MODEL = "qwen2.5-coder-1.5b"
RESULTS = frontier.RESULTS / "frontier-qwen15.jsonl"
COST = frontier.RESULTS / "frontier-qwen15-cost.json"
SPEED = frontier.RESULTS / "frontier-qwen15-speed.json"
FLASH = ["-fa", "on"]  # one flash-attention setting for every row (llama.cpp's CPU default, `auto`, picks on)
CODE = ["argparse.py", "difflib.py", "textwrap.py", "fractions.py", "statistics.py", "heapq.py"]
K_TYPES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m", "q3_k_s", "q2_k", "iq4_xs"]
# the rows without an imatrix first: they need no calibration pass, so the grid has rows before the pass ends
DENSE = K_TYPES + [f"{k}+imatrix" for k in K_TYPES] + ["iq3_m+imatrix", "iq3_xxs+imatrix", "iq2_m+imatrix"]
PRUNED_TYPES = ["q4_k_m+imatrix", "q5_k_m+imatrix", "q6_k+imatrix"]
# Mild widths, rows multiples of 256 (--round-to auto): query heads inside the 2 KV groups, or one KV group
WIDTHS = {"tx85": dict(heads=10, kv_heads=2, mlp_ratio=0.85), "tx70": dict(heads=8, kv_heads=2, mlp_ratio=0.70),
          "kv1": dict(heads=6, kv_heads=1, mlp_ratio=0.85)}
POINTS = {"dense": DENSE} | {f"{w}{rc}": PRUNED_TYPES for w in WIDTHS for rc in ("", "-rc")} \
    | {f"depth{n}-llama": ["q4_k_m+imatrix"] for n in (2, 4)}
CALIB = dict(calib_samples=32, seq_len=1024, batch_size=2)


def code_text(work: Path) -> Path:
    """Source files that ship with this Python (never used for calibration), joined."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = work / "code_eval.txt"
    out.write_text("\n\n".join((lib / name).read_text() for name in CODE))
    return out


def memory_at(gguf: Path, kv: str, threads: int, ctx: int = 4096) -> dict:
    """What llama.cpp reports it allocates for this file at `ctx` tokens (its memory breakdown, MiB)."""
    cmd = [str(frontier.tool("llama-completion")), "-m", str(gguf), "-c", str(ctx), "-n", "1", "-p", "def",
           "-no-cnv", "-v", "-t", str(threads), "-ctk", kv, "-ctv", kv, *FLASH]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    parts = re.findall(r"memory_breakdown_print: \|\s+- (\S+)\s+\|\s+(\d+) =\s+(\d+) \+\s+(\d+) \+\s+(\d+)", log)
    if not parts:
        raise RuntimeError(f"llama-completion printed no memory breakdown for {gguf}: {log[-1500:]}")
    model, context, compute = (sum(int(p[i]) for p in parts) for i in (2, 3, 4))
    return {"weights_mib": model, "kv_mib": context, "compute_mib": compute, "total_mib": model + context + compute}


def source_f16(work: Path, point: str, a) -> tuple[Path, str, list[int] | None]:
    """The point's F16 GGUF (made once), the model it came from, and the layers llama-quantize drops."""
    from transact_edge.exporters.gguf import GGUFExportOptions, export

    layers = None
    source = MODEL
    if point.startswith("depth"):
        layers = frontier.shortgpt_layers(int(point[5:].split("-")[0]), MODEL)
    elif point != "dense":
        source = str(prune_point(work, point, a))
    f16 = work / f"{'dense' if layers else point}-f16.gguf"
    if not f16.is_file():
        export(GGUFExportOptions(source, "f16", f16))
    return f16, source, layers


def dense_matrix(work: Path, a) -> Path:
    """The dense model's importance matrix (`export --imatrix auto`'s pass): the one calibration pass the
    grid makes; it ranks every TransAct cut (prune --imatrix) and, cut to the kept columns, quantizes it."""
    f16, _, _ = source_f16(work, "dense", a)
    matrix = f16.with_name("dense-imatrix.gguf")
    return matrix if matrix.is_file() else frontier.importance_matrix(MODEL, f16)


def prune_point(work: Path, point: str, a) -> Path:
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions, prune

    out = work / point
    if not (out / "transact.json").is_file():
        name, _, rc = point.partition("-")
        prune(PruneOptions(model=MODEL, out=out, widths=WidthRequest(**WIDTHS[name], round_to="auto"),
                           imatrix=str(dense_matrix(work, a)), train_tokens=0, reconstruct=rc == "rc", seed=0,
                           force=True, **CALIB))
    return out


def run(a) -> None:
    a.work.mkdir(parents=True, exist_ok=True)
    texts = {"wiki": frontier.texts(a)["wiki"], "code": code_text(a.work)}
    done = frontier.done_rows(RESULTS)
    for point in a.only or POINTS:
        todo = [t for t in POINTS[point] if (point, t) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        f16, source, layers = source_f16(a.work, point, a)
        record = {"point": point, "seconds_source": round(time.perf_counter() - t0), "pruned_layers": layers}
        if point != "dense" and not layers:
            report = json.loads((Path(source) / "transact.json").read_text())
            record |= {"params": report["pruned"]["params"], "row_lengths": report["shots"][-1].get("row_lengths"),
                       "seconds_prune": report["seconds"]}
        for outtype in todo:
            t0 = time.perf_counter()
            matrix = None if "+imatrix" not in outtype else \
                Path(source) / "imatrix.gguf" if Path(source).is_dir() else dense_matrix(a.work, a)
            gguf = frontier.quantize(f16, outtype, layers, matrix)
            row = record | {"type": outtype, "bytes": gguf.stat().st_size,
                            "seconds_quantize": round(time.perf_counter() - t0)}
            row |= {f"ppl_{k}": frontier.perplexity(gguf, f, a, FLASH) for k, f in texts.items()}
            row |= {f"mem4k_{kv}": memory_at(gguf, kv, a.threads) for kv in ("f16", "q8_0")}
            row |= {"file": gguf.name, "chunks": a.chunks, "flash_attn": "on", "machine": machine()}
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("point", "type", "bytes", "ppl_wiki", "ppl_code")}), flush=True)
            if a.commit:
                commit(f"frontier-qwen15: {point} {outtype} (wiki {row['ppl_wiki']:.2f}, code {row['ppl_code']:.2f})")


def commit(message: str) -> None:
    """Commit the rows file alone; a busy index (another commit at the same moment) waits for the next row."""
    for cmd in (["git", "add", str(RESULTS)], ["git", "commit", "-q", "-m", message, "--", str(RESULTS)]):
        subprocess.run(cmd, cwd=RESULTS.parent, capture_output=True)


def cost(a) -> None:
    """One file end to end on this machine: the numbers the grid's size comes from."""
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    f16, _, _ = source_f16(a.work, "dense", a)
    t_f16 = time.perf_counter() - t0
    t0 = time.perf_counter()
    gguf = frontier.quantize(f16, "q4_k_m")
    t_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    frontier.perplexity(gguf, code_text(a.work), a, FLASH)
    t_ppl = time.perf_counter() - t0
    t0 = time.perf_counter()
    tg = frontier.decode_speed(gguf, a, FLASH)
    t_bench = time.perf_counter() - t0
    found = {"f16_export_s": t_f16, "quantize_q4_k_m_s": t_q, "perplexity_s_per_chunk": t_ppl / a.chunks,
             "bench_s": t_bench, "tg64_tok_s": tg, "chunks": a.chunks, "machine": machine()}
    COST.write_text(json.dumps(found, indent=1) + "\n")
    print(json.dumps(found))


def speed(a) -> None:
    """Decode tok/s of every scored file, all in one llama-bench run (flash attention on, as scored)."""
    files = [a.work / r["file"] for r in frontier.read_rows(RESULTS) if (a.work / r["file"]).is_file()]
    cmd = [str(frontier.tool("llama-bench")), *[x for f in dict.fromkeys(files) for x in ("-m", str(f))], "-p", "0",
           "-n", "64", "-r", "3", "-t", str(a.threads), "-o", "json", *FLASH]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    rows = {Path(r["model_filename"]).name: {"tg64_tok_s": r["avg_ts"], "stddev": r["stddev_ts"]} for r in out}
    SPEED.write_text(json.dumps({"machine": machine(), "threads": a.threads, "files": rows}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


AXES = {"bytes": ("GGUF MiB", 2**20, True), "mem4k": ("MiB at 4K context, F16 KV (llama.cpp)", 1, True),
        "mem4k_q8": ("MiB at 4K context, Q8_0 KV (llama.cpp)", 1, True), "speed": ("decode tok/s (tg64)", 1, False)}


def report(a) -> None:
    """frontier-qwen15.md (every row; the fronts each row is on) and frontier-qwen15.png."""
    rows = frontier.read_rows(RESULTS)
    speeds = json.loads(SPEED.read_text())["files"] if SPEED.is_file() else {}
    for r in rows:
        r["mem4k"], r["mem4k_q8"] = r["mem4k_f16"]["total_mib"], r["mem4k_q8_0"]["total_mib"]
        if r["file"] in speeds:
            r["speed"] = speeds[r["file"]]["tg64_tok_s"]
    axes = [x for x in AXES if all(x in r for r in rows)]
    fronts = {(x, k): frontier.pareto(rows, k, x, AXES[x][2]) for x in axes for k in ("ppl_wiki", "ppl_code")}
    lines = [f"Qwen2.5-Coder-1.5B-Instruct on this CPU, no recovery training. llama-perplexity -c 512, first "
             f"{rows[0]['chunks']} chunks of each text (`wiki` = the shipped held-out pages, `code` = modules of "
             "Python's standard library), flash attention on for every row; memory as llama.cpp reports it "
             "(weights + KV + compute) at 4,096 tokens; decode from one llama-bench run over every file. "
             "Rows above Q4_K_M re-quantize the Q4_K_M source. Fronts: a row no other row beats on that axis "
             f"and perplexity. `python benchmarks/frontier_qwen15.py run/speed/report`, up to "
             f"{max(r['machine']['date'] for r in rows)[:16]} UTC.\n",
             "| point | type | MiB | MiB@4K f16 KV | MiB@4K q8_0 KV | tok/s | ppl wiki | ppl code | on the front |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in sorted(enumerate(rows), key=lambda x: x[1]["bytes"]):
        on = [f"{x}/{k[4:]}" for (x, k), f in fronts.items() if i in f]
        tok = f"{r['speed']:.1f}" if "speed" in r else "-"
        lines.append(f"| {r['point']} | {r['type']} | {r['bytes'] / 2**20:.0f} | {r['mem4k']} | {r['mem4k_q8']} | {tok} | "
                     f"{r['ppl_wiki']:.2f} | {r['ppl_code']:.3f} | {', '.join(on) or '-'} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, axes, fronts)


def plot(rows: list[dict], axes: list[str], fronts: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, len(axes), figsize=(5 * len(axes), 8), squeeze=False)
    for col, x in enumerate(axes):
        label, scale, _ = AXES[x]
        for row, k in enumerate(("ppl_wiki", "ppl_code")):
            ax = grid[row][col]
            for point in sorted({r["point"] for r in rows}):
                ax.plot(*zip(*[(r[x] / scale, r[k]) for r in rows if r["point"] == point]), "o", ms=4, label=point)
            ax.plot(*zip(*sorted((rows[i][x] / scale, rows[i][k]) for i in fronts[x, k])), "k--", lw=1, label="front")
            ax.set(xlabel=label, ylabel=f"llama.cpp perplexity ({k[4:]})", yscale="log")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["cost", "run", "speed", "report"])
    p.add_argument("--work", type=Path, default=Path("/tmp/frontier-qwen15"))
    p.add_argument("--chunks", type=int, default=4, help="llama-perplexity chunks of 512 tokens per text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=list(POINTS), help="these points only, in this order")
    p.add_argument("--commit", action="store_true", help="git-commit the rows file after each row")
    a = p.parse_args()
    a.second_text = None
    {"cost": cost, "run": run, "speed": speed, "report": report}[a.what](a)


if __name__ == "__main__":
    main()
