"""Dense vs TransAct-pruned SmolLM2 in llama.cpp: speed, KV cache, memory, roofline, latency.

    pip install -e ".[bench]" && python benchmarks/speed.py [--reps 3] [--device local] [--work DIR]

Prunes the embedded SmolLM2-135M with `transact-edge prune` to the demo's widths (2 KV heads, 6 query
heads, MLP x0.5), uniform and --per-layer, without recovery training (weights do not change speed),
exports dense and pruned as F16, Q8_0 and Q4_0, and runs `transact-edge bench` (llama-bench when
`build-llama` has built it) on each: pp512, tg128, tg128 @ d1024 and d4096; then the paper-style
latency table (prefix + decode) on the Q8_0 files. Checks the issue's goal: pruned/dense tg ratio
>= 0.9 x the ratio of bytes read per token. Writes benchmarks/results/speed.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUANTS = ("f16", "q8_0", "q4_0")
DEPTHS = (0, 1024, 4096)
LATENCY = ((64, 64), (128, 64), (256, 64), (512, 64), (960, 64), (256, 128), (256, 256), (256, 512))
PRUNE = ["--kv-heads", "2", "--mlp-ratio", "0.5", "--calib-samples", "32", "--seq-len", "512"]


def cli(*argv: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "transact_edge", *argv]
    print("+ transact-edge " + " ".join(argv), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return proc.stdout or ""


def models(work: Path) -> dict[str, Path]:
    """{name-quant: gguf} for dense, uniform and per-layer pruned SmolLM2, made once in `work`."""
    sources = {"dense": "smollm2-135m", "uniform": str(work / "uniform"), "per_layer": str(work / "per_layer")}
    for name, extra in (("uniform", []), ("per_layer", ["--per-layer"])):
        if not (work / name / "transact.json").is_file():
            cli("prune", *PRUNE, *extra, "--out", str(work / name), "--force")
    out = {}
    for name, src in sources.items():
        for q in QUANTS:
            path = out[f"{name}-{q}"] = work / f"{name}-{q}.gguf"
            if not path.is_file():
                cli("export", src, "--format", "gguf", "--outtype", q, "--outfile", str(path))
    return out


def goals(rows: list[dict], sums: dict[str, dict]) -> list[dict]:
    """Pruned/dense tg ratio against the ratio of bytes read per token, per quant, variant and depth."""
    tg = {(r["model"], r["n_depth"]): r for r in rows if r["n_gen"] and not r["n_prompt"]}
    out = []
    for q in QUANTS:
        for variant in ("uniform", "per_layer"):
            for d in DEPTHS:
                dense, pruned = tg[(f"dense-{q}", d)], tg[(f"{variant}-{q}", d)]
                bytes_of = {m: sums[m]["weight_bytes_per_token"] + d * sums[m]["kv_bytes_per_token"]
                            for m in (dense["model"], pruned["model"])}
                speed = pruned["ts_mean"] / dense["ts_mean"]
                limit = bytes_of[dense["model"]] / bytes_of[pruned["model"]]
                out.append({"quant": q, "variant": variant, "depth": d, "tg_ratio": speed, "bytes_ratio": limit,
                            "share": speed / limit, "met": speed >= 0.9 * limit})
    return out


def markdown(result: dict) -> str:
    rows, sums = result["speed"]["rows"], {m["model"]: m for m in result["speed"]["models"]}
    lines = [f"# Speed: dense vs TransAct-pruned SmolLM2 ({result['date']})", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. Device {result['speed']['device']}, {result['speed']['threads']} threads, "
             f"read bandwidth {result['speed']['bandwidth_gbps']:.1f} GB/s (membw). Backend: "
             f"{rows[0]['backend']}. Command: `{result['command']}`.", "",
             "| model | size MiB | test | t/s | roofline t/s | of roofline |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        roof = f"{r['roofline_ts']:.1f} | {100 * r['roofline_share']:.0f}%" if r["roofline_ts"] else "- | -"
        lines.append(f"| {r['model']} | {r['size_mib']:.1f} | {r['test']} | {r['ts_mean']:.2f} ± {r['ts_sd']:.2f} | {roof} |")
    lines += ["", "| model | KV MiB @ ctx (llama.cpp) | per-layer sum | ctx | peak RSS MiB | weight bytes/token |",
              "|---|---:|---:|---:|---:|---:|"]
    for m in sums.values():
        lines.append(f"| {m['model']} | {m['kv_mib_llama_cpp']:.2f} | {m['kv_mib_per_layer_sum']:.2f} | {m['kv_ctx']} | "
                     f"{m['peak_rss_mib']:.0f} | {m['weight_bytes_per_token']:,} |")
    lines += ["", "Goal: pruned/dense tg ratio >= 0.9 x bytes-per-token ratio (dense bytes / pruned bytes).", "",
              "| quant | variant | depth | tg ratio | bytes ratio | share | goal |", "|---|---|---:|---:|---:|---:|---|"]
    for g in result["goals"]:
        lines.append(f"| {g['quant']} | {g['variant']} | {g['depth']} | {g['tg_ratio']:.3f} | {g['bytes_ratio']:.3f} | "
                     f"{g['share']:.2f} | {'met' if g['met'] else 'NOT met'} |")
    lat = [r for r in result["latency"]["rows"]]
    names = list(dict.fromkeys(r["model"] for r in lat))
    lines += ["", "Latency (ms), prefix + decode, Q8_0:", "",
              "| prefix + decode | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for p, n in LATENCY:
        cells = [next(r for r in lat if r["model"] == m and r["n_prompt"] == p and r["n_gen"] == n) for m in names]
        lines.append(f"| {p} + {n} | " + " | ".join(f"{c['latency_ms']:.0f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["speed"]["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for q, ax in zip(QUANTS, axes):
        for variant, style in (("dense", "o-"), ("uniform", "s-"), ("per_layer", "^-")):
            pts = sorted((r["n_depth"], r["ts_mean"], r["ts_sd"]) for r in rows
                         if r["model"] == f"{variant}-{q}" and r["n_gen"] and not r["n_prompt"])
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], fmt=style, label=variant)
        ax.set(title=f"tg128, {q.upper()}", xlabel="depth (tokens in KV cache)", ylabel="tokens/s")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M dense vs TransAct-pruned, llama.cpp, {result['speed']['device']} "
                 f"({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="local")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "transact_edge" / "speed")
    ap.add_argument("--out", type=Path, default=RESULTS / "speed")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    files = models(a.work)
    common = ["--device", a.device, "-r", str(a.reps), "-o", "json", *(["-t", str(a.threads)] if a.threads else [])]
    start = time.time()
    speed = json.loads(cli("bench", *map(str, files.values()), "-p", "512", "-n", "128",
                           "-d", ",".join(map(str, DEPTHS)), *common, capture=True))
    q8 = [str(files[f"{v}-q8_0"]) for v in ("dense", "uniform", "per_layer")]
    pg = [x for p, n in LATENCY for x in ("-pg", f"{p},{n}")]
    latency = json.loads(cli("bench", *q8, "-p", "0", "-n", "0", *pg, *common, capture=True))
    sums = {m["model"]: m for m in speed["models"]}
    result = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(),
              "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "seconds": time.time() - start,
              "prune": PRUNE, "speed": speed, "latency": latency, "goals": goals(speed["rows"], sums)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    a.out.with_suffix(".md").write_text(markdown(result))
    plot(result, a.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
