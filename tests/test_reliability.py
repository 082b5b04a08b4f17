"""Faults a long job meets, tried on real processes: kill -9 at seeded moments inside each write phase,
SIGINT/SIGTERM, two runs aimed at one output, file-size limits, full and read-only filesystems.

The kill campaign's size is TRANSACT_EDGE_KILLS (kills per target; a few in the normal suite). The
figures in the README come from `TRANSACT_EDGE_KILLS=20 python -m pytest -m reliability -s`, which also
writes benchmarks/results/reliability_kills.json. The build-llama campaign is in test_reliability_builds.py.
"""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (KILLS, TEMPORARY, digest, export_args, held, kill_at, leftovers, one_error, phase, prune_args,
                     record_kills, run, same_weights, signal_bits, start)
from transact_edge.checkpoint import HOLD
from transact_edge.lock import claim

pytestmark = pytest.mark.reliability


def test_kill_9_during_prune_then_resume_gives_the_uninterrupted_weights(tiny_llama_dir, tmp_path):
    """Kills anywhere (seeded times) and inside writes (a checkpoint's, the output's): never an incomplete
    output; --resume then sweeps what the dead run left and ends with the uninterrupted run's weights."""
    ref = tmp_path / "reference"
    t = time.monotonic()
    assert run(prune_args(tiny_llama_dir, ref)).returncode == 0
    horizon = time.monotonic() - t
    rng, landed = random.Random(0), []
    for i in range(KILLS):
        out = tmp_path / f"run{i}"
        during = (None, "writing a checkpoint", "writing the output")[i % 3]
        landed.append(kill_at(prune_args(tiny_llama_dir, out), out, rng, horizon, during))
        assert not out.exists() or same_weights(out, ref), landed[-1]  # published only whole
        if not out.exists():
            done = run(prune_args(tiny_llama_dir, out) + ["--resume"])
            assert done.returncode == 0, done.stderr
        assert same_weights(out, ref), landed[-1]
        assert json.loads((out / "transact.json").read_text())["plan"] == \
            json.loads((ref / "transact.json").read_text())["plan"]
        assert leftovers(tmp_path) == [], landed[-1]
    record_kills("prune", landed)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_kill_9_during_export_leaves_the_old_file_or_none(fmt, tiny_llama_dir, tmp_path):
    ref = tmp_path / "reference" / f"m.{fmt}"  # the same name in every run: the name is in the metadata
    ref.parent.mkdir()
    t = time.monotonic()
    assert run(export_args(fmt, tiny_llama_dir, ref)).returncode == 0
    horizon, expected = time.monotonic() - t, digest(ref)
    rng, landed = random.Random(1), []
    for i in range(KILLS):
        out = tmp_path / f"run{i}" / f"m.{fmt}"
        out.parent.mkdir()
        during = (None, "writing the output")[i % 2]
        landed.append(kill_at(export_args(fmt, tiny_llama_dir, out), out, rng, horizon, during))
        assert not out.exists() or digest(out) == expected, landed[-1]
        done = run(export_args(fmt, tiny_llama_dir, out))
        assert done.returncode == 0, done.stderr
        assert digest(out) == expected and leftovers(tmp_path) == [], landed[-1]
    record_kills(f"export --format {fmt}", landed)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_clean_up(sig, code, tiny_llama_dir, tmp_path):
    """The signal reaches the export while it is held inside the write (never a finished process: a race)."""
    out = tmp_path / "m.gguf"
    proc = start(export_args("gguf", tiny_llama_dir, out), env=os.environ | {HOLD: str(out)})
    held(proc)
    assert phase(out) == "writing the output"
    assert signal_bits(proc.pid, "SigCgt") & 1 << sig - 1, (f"the child does not catch {sig!r}: "
                                                            f"{signal_bits(proc.pid)} (this worker: {signal_bits(os.getpid())})")
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait() == code, proc.stderr_text()
    assert not out.exists() and leftovers(tmp_path) == []


def test_second_run_on_one_output_exits_2_at_once(tiny_llama_dir, tmp_path):
    """The first run to start holds the lock and finishes; the second leaves at once, touching nothing."""
    out = tmp_path / "pruned"
    first = start(prune_args(tiny_llama_dir, out), env=os.environ | {HOLD: str(out)})
    held(first)  # stopped inside its publish, the lock held: the second cannot come after it, nor outwait it
    second = run(prune_args(tiny_llama_dir, out), timeout=600)  # returning at all proves it did not wait
    assert second.returncode == 2 and "another run" in one_error(second.stderr)
    first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr_text()
    assert (out / "transact.json").is_file() and leftovers(tmp_path) == []
    gguf = tmp_path / "m.gguf"
    with claim(gguf):  # an export holding the lock (here: this process)
        busy = run(export_args("gguf", tiny_llama_dir, gguf))
    assert busy.returncode == 2 and f"pid {os.getpid()}" in one_error(busy.stderr) and not gguf.exists()


def _limit_file_size(limit: int):
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("what", ["gguf", "onnx", "prune"])
def test_a_write_that_fails_part_way_ends_in_one_line(what, tiny_llama_dir, tmp_path):
    """A file-size limit (ulimit -f) stops the write mid-file: exit 2, one line naming the output, no
    temporaries, the input untouched."""
    before = digest(tiny_llama_dir)
    out = tmp_path / ("pruned" if what == "prune" else f"m.{what}")
    args = prune_args(tiny_llama_dir, out) if what == "prune" else export_args(what, tiny_llama_dir, out)
    done = run(args, preexec_fn=_limit_file_size(4 << 20))
    line = one_error(done.stderr)
    assert done.returncode == 2 and str(out.parent) in line and out.name in line and "too large" in line.lower()
    kept = [f".{out.name}.partial"] if what == "prune" else []  # finished shots stay for --resume
    assert not out.exists() and digest(tiny_llama_dir) == before
    assert [p for p in leftovers(tmp_path) if p.split("/")[0] not in kept or TEMPORARY.search(p)] == []


def _mount(args: list[str], where: Path) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args, str(where)], capture_output=True).returncode == 0


def test_full_and_read_only_filesystems(tiny_llama_dir, tmp_path):
    """A 2 MiB filesystem is refused before the work, with the space needed; a read-only directory at once."""
    small, ro = tmp_path / "small", tmp_path / "ro"
    small.mkdir(), ro.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs"], small):
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE test covers a write failing part-way)")
    try:
        done = run(export_args("gguf", tiny_llama_dir, small / "m.gguf"))
        assert done.returncode == 2 and "needs about" in one_error(done.stderr) and "GiB free" in done.stderr
        assert list(small.iterdir()) == []
        done = run(prune_args(tiny_llama_dir, small / "pruned"))
        assert done.returncode == 2 and "needs about" in one_error(done.stderr) and list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])
    assert _mount(["--bind", "-o", "ro", str(ro)], ro) or os.chmod(ro, 0o555) is None  # (root ignores modes)
    try:
        done = run(export_args("gguf", tiny_llama_dir, ro / "m.gguf"))
        assert done.returncode == 2 and str(ro) in one_error(done.stderr)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)



def test_pruning_peaks_below_one_and_a_half_times_the_fp32_weights():
    """In-memory pruning of SmolLM2 without recovery, in a fresh process: peak RSS above the RSS after
    the imports <= 1.5 x the float32 weights (the cut layers' file pages are given back as they go)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prune_memory.py"
    done = subprocess.run([sys.executable, str(script), "probe", "smollm2-135m", "--calib-samples", "2",
                           "--seq-len", "128"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["peak_above_imports_over_fp32"] <= 1.5, figures


def _workers(tag: str) -> dict[int, int]:
    """{rank: pid} of the launched processes carrying `tag` in their environment."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
        except (OSError, ValueError):
            continue
        if env.get("TRANSACT_EDGE_TEST_TAG") == tag and "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.mark.parametrize("victim", [0, 1])
def test_a_launched_process_that_dies_takes_the_others_down(victim, tiny_llama_dir, tmp_path):
    """kill -9 of one of two torchrun processes mid-run: the launcher ends non-zero within a minute and
    no process is left waiting on a collective; nothing is published."""
    out, tag = tmp_path / "pruned", f"t{os.getpid()}-{victim}"
    args = prune_args(tiny_llama_dir, out)
    args[args.index("--train-tokens") + 1] = str(64 * 2 * 400)  # long enough to be killed mid-recovery
    launcher = start(args + ["--launcher", "torchrun", "--processes", "2"], env=os.environ | {"TRANSACT_EDGE_TEST_TAG": tag})
    deadline = time.monotonic() + 300
    while len(workers := _workers(tag)) < 2 or not (tmp_path / ".pruned.partial").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr_text()[-2000:]
        time.sleep(0.2)
    os.kill(workers[victim], signal.SIGKILL)
    t = time.monotonic()
    assert launcher.wait(timeout=60) != 0
    print(f"\nrank {victim} killed: the launcher ended {time.monotonic() - t:.1f} s later")
    assert time.monotonic() - t < 60 and _workers(tag) == {} and not out.exists()
