"""Our GGUF export against llama.cpp's own convert_hf_to_gguf.py, same checkpoint and outtype.

    python benchmarks/export_speed.py CHECKPOINT_DIR --outtype q8_0

llama.cpp's converter is taken from the sdist of the installed llama-cpp-python version (fetched
with `pip download` into ~/.cache/transact_edge/builds/sdist, the package registry being the only network
allowed), with its own vendored gguf-py. Each side runs in its own process; wall time and peak RSS
(of the child, from its VmHWM) are recorded. Goal (issue 3): ours <= 1.0 x its time.
Writes benchmarks/results/export_speed.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from transact_edge.devices import Local  # noqa: E402
from transact_edge.llamabuild import vendored_source  # noqa: E402

def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of one command in its own process (VmHWM, see devices.base)."""
    argv = ["env", *(f"{k}={v}" for k, v in (env or {}).items()), *cmd]
    start = time.perf_counter()
    res = Local().run(argv)
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": res.peak_rss_mib, "ok": res.rc == 0,
            "tail": (res.stdout + res.stderr)[-600:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--outtype", default="q8_0", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_speed.json")
    a = ap.parse_args()
    llama_dir = vendored_source()
    with tempfile.TemporaryDirectory() as tmp:
        ours = timed([sys.executable, "-m", "transact_edge", "export", str(a.checkpoint), "--format", "gguf",
                      "--outtype", a.outtype, "--outfile", f"{tmp}/ours.gguf"])
        env = {"PYTHONPATH": str(llama_dir / "gguf-py")}
        theirs = timed([sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(a.checkpoint),
                        "--outtype", a.outtype, "--outfile", f"{tmp}/theirs.gguf"], env=env)
        for r, name in ((ours, "ours"), (theirs, "theirs")):
            f = Path(tmp) / f"{name}.gguf"
            r["bytes"] = f.stat().st_size if f.exists() else None
    result = {"machine": machine(), "checkpoint": str(a.checkpoint), "outtype": a.outtype,
              "transact_edge": ours, "convert_hf_to_gguf": theirs,
              "time_ratio": ours["seconds"] / theirs["seconds"] if theirs["ok"] else None}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for name, r in (("transact-edge export", ours), ("convert_hf_to_gguf.py", theirs)):
        print(f"{name:24s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  ok={r['ok']}")
    if result["time_ratio"]:
        print(f"time ratio ours/theirs: {result['time_ratio']:.2f}")
    else:
        print("llama.cpp's converter failed:\n" + theirs["tail"])


if __name__ == "__main__":
    main()
