"""How fast the CLI answers: `transact-edge --help`, `export --help` and `bench --help` wall time, each
in a fresh process (the goal: --help <= 0.5 s), median of --runs.

    python benchmarks/startup.py --runs 10

Writes benchmarks/results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


COMMANDS = {"--help": ["--help"], "export --help": ["export", "--help"], "bench --help": ["bench", "--help"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup.json")
    a = ap.parse_args()
    exe = shutil.which("transact-edge") or sys.exit("transact-edge is not installed (pip install -e .)")
    rows = []
    for name, argv in COMMANDS.items():
        seconds = []
        for _ in range(a.runs):
            start = time.perf_counter()
            subprocess.run([exe, *argv], check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
        rows.append({"command": f"transact-edge {name}", "median_s": statistics.median(seconds),
                     "max_s": max(seconds), "runs": a.runs})
        print(f"transact-edge {name}: {rows[-1]['median_s']:.3f} s median (max {rows[-1]['max_s']:.3f})")
    a.out.write_text(json.dumps({"machine": machine(), "goal_help_s": 0.5, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
