"""The whole chain on Qwen2.5-Coder-1.5B through the CLI, as a user runs it (issues 22 and 23): prune ->
GGUF at F16, Q8_0, Q4_K_M (importance matrix `auto`) and IQ4_XS, each with --verify -> ONNX int4 with
--verify -> bench against the dense Q4_K_M. Every step is its own `transact-edge` process; its wall time,
peak RSS (wait4's ru_maxrss) and exit status are recorded, and the verify lines kept, in
benchmarks/results/chain_qwen15.json (rewritten after each step; a finished step is skipped on a re-run).

    python benchmarks/chain_qwen15.py [--refit] [--onnx int4|fp32|none]

ONNX fp32 of a 1.5B model is ~6 GB of external data and its export holds the model and the traced
graph at once: int4 (weight-only MatMulNBits) is the default on a 24 GiB machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "chain_qwen15.json"
MODEL = "qwen2.5-coder-1.5b"
WIDTHS = ["--heads", "6", "--kv-heads", "1", "--mlp-ratio", "0.85", "--round-to", "auto"]  # frontier point kv1


def step(name: str, argv: list[str], found: dict) -> dict:
    """Run one CLI command unless it already succeeded; record time, peak RSS, status and its verify lines."""
    if found.get(name, {}).get("rc") == 0:
        return found[name]
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "transact_edge", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [l for l in out.replace("\r", "\n").splitlines() if l.strip() and "it/s]" not in l and "tensor/s]" not in l]
    found[name] = {"argv": argv, "rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
                   "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
                   "verify": [l for l in lines if "verify" in l and ("PASS" in l or "FAIL" in l)], "tail": lines[-12:]}
    print(json.dumps({name: {k: v for k, v in found[name].items() if k != "tail"}}, indent=1), flush=True)
    return found[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/chain-qwen15"))
    p.add_argument("--refit", action="store_true", help="prune --reconstruct (float64 Grams layer by layer; slow)")
    p.add_argument("--onnx", default="int4", choices=["int4", "fp32", "none"])
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    found = json.loads(RESULTS.read_text())["steps"] if RESULTS.is_file() else {}
    pruned = a.work / "kv1"
    plan = [("prune", ["prune", "--model", MODEL, *WIDTHS, "--calib-samples", "32", "--seq-len", "1024",
                       "--batch-size", "2", *(["--reconstruct"] if a.refit else []), "--out", str(pruned), "--force"])]
    for outtype in ("f16", "q8_0", "q4_k_m", "iq4_xs"):
        matrix = ["--imatrix", "auto"] if outtype == "q4_k_m" else []  # IQ4_XS runs without one (a second pass: ~20 min)
        plan.append((f"gguf {outtype}", ["export", str(pruned), "--format", "gguf", "--outtype", outtype, *matrix,
                                          "--outfile", str(a.work / f"kv1-{outtype}.gguf"), "--verify"]))
    if a.onnx != "none":
        kind = ["--quantize", "int4"] if a.onnx == "int4" else ["--dtype", "fp32"]
        plan.append((f"onnx {a.onnx}", ["export", str(pruned), "--format", "onnx", *kind,
                                         "--outfile", str(a.work / f"kv1-onnx-{a.onnx}"), "--verify"]))
    plan.append(("dense q4_k_m", ["export", MODEL, "--format", "gguf", "--outtype", "q4_k_m", "--imatrix", "auto",
                                  "--outfile", str(a.work / "dense-q4_k_m.gguf")]))
    plan.append(("bench", ["bench", str(a.work / "dense-q4_k_m.gguf"), str(a.work / "kv1-q4_k_m.gguf"),
                           "-p", "128", "-n", "32", "-r", "2", "-t", "2"]))
    for name, argv in plan:
        if step(name, argv, found)["rc"] != 0 and name == "prune":
            break
        RESULTS.write_text(json.dumps({"machine": machine(), "steps": found}, indent=1) + "\n")
    RESULTS.write_text(json.dumps({"machine": machine(), "steps": found}, indent=1) + "\n")


if __name__ == "__main__":
    main()
