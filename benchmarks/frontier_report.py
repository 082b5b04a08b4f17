"""`python benchmarks/frontier.py report`: frontier.md (every row of frontier.jsonl), frontier.png with the
Pareto fronts, and the short table the demo shows (transact_edge/data/frontier.md)."""
from __future__ import annotations

import json
from pathlib import Path

from frontier import RESULTS, SPEED, done_rows, pareto, read_rows, shape_of


def _host(r: dict) -> str:
    cores = r["machine"]["cores"]
    return f"{cores}-core {'GPU host' if cores > 2 else 'VM'}"


def _decode(r: dict) -> str:
    if "speed" in r:
        return f"{r['speed']:.0f}"
    return f"{r['tg64_tok_s']:.0f} ({_host(r)})" if "caveat_speed" not in r else "- (machine busy)"


def table(rows: list[dict], keys: list[str], fronts: dict[str, set[int]], picked, where: str) -> list[str]:
    lines = ["| point | type | MiB | " + " | ".join(f"ppl {k[4:]}" for k in keys) + f" | decode tok/s ({where}) | "
             "on the front |", "|---|---|---:|" + "---:|" * len(keys) + "---:|---|"]
    for i, r in sorted(enumerate(rows), key=lambda x: x[1]["bytes"]):
        if picked(i, r):
            lines.append(f"| {r['point']}{' *' if r.get('caveat') else ''} | {r['type']} | {r['bytes'] / 2**20:.1f} | "
                         + " | ".join(f"{r[k]:.1f}" for k in keys) + f" | {_decode(r)} |"
                         + f" {', '.join(k[4:] for k in keys if i in fronts[k]) or '-'} |")
    return lines


def report(a) -> None:
    """frontier.md (every row), frontier.png, and the short table the demo shows (package data)."""
    rows = read_rows(a.results)
    fresh = done_rows(a.results)  # a re-run replaces the row it was made to replace
    rows = [r for r in rows if not (r.get("caveat") and (r["point"], r["type"]) in fresh)]
    speeds = json.loads(SPEED.read_text()) if SPEED.is_file() else {"rows": []}
    by_shape = {(s["shape"], s["type"]): s["tg64_tok_s"] for s in speeds["rows"]}
    for r in rows:
        if (shape_of(r["point"]), r["type"]) in by_shape:
            r["speed"] = by_shape[shape_of(r["point"]), r["type"]]
    keys = [k for k in ("ppl_wiki", "ppl_news") if all(k in r for r in rows)]
    fronts = {k: pareto(rows, k) for k in keys}
    date = max(r["machine"]["date"] for r in rows)[:10]
    where = (f"{speeds['machine']['cores']}-core VM, every shape in one run" if speeds["rows"] else "host")
    head = (f"GGUF bytes vs perplexity scored by llama.cpp (llama-perplexity -c 512, first {rows[0]['chunks']} "
            f"chunks of each text: `wiki` = the shipped held-out pages, `news` = the Lee news corpus, never seen "
            f"in recovery). Measured up to {date}, `python benchmarks/frontier.py point ...` (pruning and recovery "
            "on a lent H200; the points scored on 2026-12-07 on an H100). A row is on the front when no other row is at most its size and perplexity. "
            + ("Decode speed (llama-bench tg64) from `python benchmarks/frontier.py speed`: each shape measured "
               f"on one host in one run ({speeds['machine']['date'][:10]}, {speeds['threads']} threads); a value "
               "with a host in brackets was measured where the point was scored. " if speeds["rows"] else
               "Decode speeds are only comparable between rows of the same host. ")
            + ("* recovered with its windows in corpus order (the streamed data was not shuffled yet): to be "
               "re-run.\n\n" if any(r.get("caveat") for r in rows) else "\n\n"))
    full = table(rows, keys, fronts, lambda i, r: True, where)
    (RESULTS / "frontier.md").write_text(head + "\n".join(full) + "\n")
    print("\n".join(full))
    short = table(rows, keys, fronts, lambda i, r: r["type"] in ("q8_0", "q4_0") or any(i in f for f in fronts.values()),
                  where)
    summary = Path(__file__).resolve().parents[1] / "transact_edge" / "data" / "frontier.md"
    summary.write_text(head + "\n".join(short) + "\n")
    plot(rows, keys, fronts)


def plot(rows: list[dict], keys: list[str], fronts: dict[str, set[int]]) -> None:
    """Bytes vs perplexity per text and, where the speed table covers the rows, decode speed vs perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "speed" in r]
    panels = [(k, "bytes", rows, fronts[k]) for k in keys] + [(k, "speed", timed, pareto(timed, k, "speed", False))
                                                              for k in keys if timed]
    fig, axes = plt.subplots(len(panels) // len(keys), len(keys), figsize=(6 * len(keys), 4.5 * len(panels) // len(keys)),
                             squeeze=False)
    for ax, (k, x, subset, front) in zip(axes.flat, panels):
        scale = 2**20 if x == "bytes" else 1
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # one colour per point (tab10 repeats after ten)
        for point in sorted({r["point"] for r in subset}):
            pts = sorted((r[x] / scale, r[k]) for r in subset if r["point"] == point)
            ax.plot(*zip(*pts), "o-" if x == "bytes" else "o", ms=4, lw=0.8, label=point)
        line = sorted((subset[i][x] / scale, subset[i][k]) for i in front)
        ax.plot(*zip(*line), "k--", lw=1.5, label="Pareto front")
        ax.set(xlabel="GGUF MiB" if x == "bytes" else "decode tok/s (llama-bench tg64)",
               ylabel=f"llama.cpp perplexity ({k[4:]})", yscale="log", title=k[4:])
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "frontier.png", dpi=120)
