"""Faults a long job meets, tried on real processes: kill -9 at seeded moments inside each write phase,
SIGINT/SIGTERM, two runs aimed at one output, file-size limits, full and read-only filesystems.

The kill campaign's size is TRANSACT_EDGE_KILLS (kills per target; a few in the normal suite). The
figures in the README come from `TRANSACT_EDGE_KILLS=20 python -m pytest -m reliability -s`, which also
writes benchmarks/results/reliability_kills.json.
"""
from __future__ import annotations

import filecmp
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transact_edge import llamabuild
from transact_edge.checkpoint import HOLD
from transact_edge.lock import claim

pytestmark = pytest.mark.reliability
KILLS = int(os.environ.get("TRANSACT_EDGE_KILLS", "2"))
CLI = [sys.executable, "-m", "transact_edge"]
# What a shell gives a command: SIGINT at its default, nothing blocked. A disposition of SIG_IGN survives exec and
# CPython then installs no KeyboardInterrupt handler, so a test process that inherited or set one (an xdist
# worker after some other test) would make Ctrl-C do nothing in the child: the SIGINT test's one failure.
AS_FROM_A_SHELL = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "signal.pthread_sigmask(signal.SIG_SETMASK, []); os.execv(sys.argv[1], sys.argv[1:])"]
TEMPORARY = re.compile(r"\..+\.(tmp|old)-[a-z0-9_]{8}(\.[a-z0-9]+)?")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reliability_kills.json"


def prune_args(src: Path, out: Path) -> list[str]:
    return ["prune", "--model", str(src), "--out", str(out), "--heads", "3", "--kv-heads", "1", "--mlp", "64",
            "--calib-samples", "4", "--seq-len", "64", "--batch-size", "2", "--shots", "2", "--train-tokens", "768",
            "--lr", "1e-3", "--device", "cpu", "--val-windows", "2", "--checkpoint-minutes", "0"]


def export_args(fmt: str, src: Path, out: Path) -> list[str]:
    return ["export", str(src), "--format", fmt, "--outfile", str(out)] + (["--outtype", "f16"] if fmt == "gguf" else [])


class Started(subprocess.Popen):
    """A process whose stderr goes to a file (a pipe nobody reads would block it once full)."""

    def stderr_text(self) -> str:
        with open(f"/proc/self/fd/{self.log.fileno()}") as log:  # its own offset: the child writes at the shared one
            return log.read()


def start(args: list[str], env: dict | None = None, **kw) -> Started:
    log = tempfile.TemporaryFile("w+")
    proc = Started(AS_FROM_A_SHELL + CLI + args, stdout=subprocess.DEVNULL, stderr=log, text=True,
                   env=(env or os.environ) | {"HF_HUB_OFFLINE": "1"}, **kw)
    proc.log = log
    return proc


def run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, env=(env or os.environ) | {"HF_HUB_OFFLINE": "1"},
                          **kw)


def one_error(stderr: str) -> str:
    """The run's single error line (progress bars may precede it on stderr); no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("transact-edge: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def leftovers(where: Path) -> list[str]:
    """Temporaries, locks and partial runs anywhere under `where`."""
    return sorted(str(p.relative_to(where)) for p in where.rglob(".*")
                  if TEMPORARY.fullmatch(p.name) or p.name.endswith((".lock", ".partial")))


def phase(out: Path) -> str:
    """Which write phase a run is in, from what it has on disk right now."""
    parent, partial = out.parent, out.parent / f".{out.name}.partial"
    if not parent.is_dir():
        return "before any write"
    if any(TEMPORARY.fullmatch(p.name) and p.name.startswith(f".{out.name}.") for p in parent.iterdir()):
        return "writing the output"
    if partial.is_dir():
        names = [p.name for p in partial.iterdir()]
        if any(TEMPORARY.fullmatch(n) for n in names):
            return "writing a checkpoint"
        return "recovery" if names else "between checkpoints"
    return "before any write" if not (parent / f".{out.name}.lock").exists() else "load, calibration, surgery"


def signal_bits(pid: int, field: str | None = None) -> int | dict[str, str]:
    """A process's signal masks from /proc (SigBlk, SigIgn, SigCgt): one as an int, or all as hex text."""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    masks = {k: status[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt")}
    return int(masks[field], 16) if field else masks


def held(proc: Started) -> None:
    """Wait until `proc` has stopped itself inside the publish that $TRANSACT_EDGE_HOLD_PUBLISH names."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"it ended before the held publish (status {status}): {proc.stderr_text()[-2000:]}"


def hold_at(during: str, out: Path) -> str:
    """The glob of the publish that `during` names: the output itself, or a checkpoint inside the partial run."""
    return {"writing the output": str(out), "writing a checkpoint": f"{out.parent}/.{out.name}.partial/*"}[during]


def kill_at(args: list[str], out: Path, rng: random.Random, horizon: float, during: str | None,
            env: dict | None = None) -> str:
    """SIGKILL a run of `args`: at a seeded moment within `horizon` s of its start, or (`during` a write
    phase) held inside that phase, its temporary written, the rename not yet done. Returns the phase it
    landed in, or 'finished' if it ended first (only a seeded moment can come too late)."""
    env = env or os.environ
    if during:
        proc = start(args, env=env | {HOLD: hold_at(during, out)})
        held(proc)
        landed = phase(out)
        assert landed == during, landed
        proc.kill()
        proc.wait()
        return landed
    proc, t0, when = start(args, env=env), time.monotonic(), rng.uniform(0.3, 1.0) * horizon
    while proc.poll() is None:
        if time.monotonic() - t0 >= when:
            landed = phase(out)
            proc.kill()
            proc.wait()
            return landed
        time.sleep(0.002)
    return "finished"


def digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _record(target: str, landed: list[str]) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    kills = sum(where != "finished" for where in landed)
    data[target] = {"kills": kills, "landed": dict(Counter(landed)), "date": time.strftime("%Y-%m-%d"),
                    "command": f"TRANSACT_EDGE_KILLS={KILLS} python -m pytest -m reliability tests/test_reliability.py"}
    if KILLS >= 10:  # the campaign's figures, not the normal suite's short run
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\n{target}: {kills} kills landed in {dict(Counter(landed))}")


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
    _record("prune", landed)


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
    _record(f"export --format {fmt}", landed)


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



@pytest.fixture
def stub_builds(tmp_path, monkeypatch):
    """build-llama against an empty cache, with `cmake` replaced by a stand-in that 'builds' by copying this
    machine's already-built tools of the same target, executable as a linker leaves them (a real build takes
    minutes; what is under test is the install step, the lock and the cache, which run for real, as does
    the C compiler for membw)."""
    real = {t: llamabuild.bin_dir(t) for t in ("native", "aarch64-linux-gnu")}
    if not all((real["native"] / t).is_file() for t in llamabuild.TOOLS):
        pytest.skip("needs `transact-edge build-llama --target native` (README command 1)")
    real_root = llamabuild.builds_root()
    sdist = real_root / "sdist" / f"llama_cpp_python-{llamabuild.version()}"
    root, stub, log = tmp_path / "builds", tmp_path / "stub", tmp_path / "cmake.log"
    (root / "sdist").mkdir(parents=True), stub.mkdir()
    (root / "sdist" / sdist.name).symlink_to(sdist)
    # `cmake --build ROOT/llama.cpp-V/TARGET-DIGEST/cmake-build`: the real tools lie at REAL_ROOT/.../bin
    (stub / "cmake").write_text(f'#!/bin/sh\necho "$@" >> {log}\nif [ "$1" = --build ]; then mkdir -p "$2/bin" && '
                                f'for t in $(cd "$(dirname "{real_root}${{2#{root}}}")/bin" && ls llama-*); do cp "$(dirname "{real_root}${{2#{root}}}")/bin/$t" '
                                f'"$2/bin/" && chmod 755 "$2/bin/$t" || exit 1; done; fi\n')
    (stub / "cmake").chmod(0o755)
    monkeypatch.setenv("TRANSACT_EDGE_BUILDS", str(root))
    env = os.environ | {"PATH": f"{stub}:{os.environ['PATH']}"}
    return llamabuild.bin_dir("native"), env, log, real["native"]


@pytest.mark.parametrize("target", ["native", "aarch64-linux-gnu"])
def test_published_tools_are_0755_and_run_through_their_published_paths(target, stub_builds):
    """A fresh machine's first build: every tool it publishes runs from where it was published (the
    aarch64 build under qemu-user), with the modes a plain build gives under umask 022."""
    import stat

    _, env, _, real = stub_builds
    if not (real.parents[2] / llamabuild.bin_dir(target).relative_to(llamabuild.builds_root())).is_dir():
        pytest.skip(f"needs `transact-edge build-llama --target {target}` (README command 1)")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    assert target == "native" or qemu, "qemu-user is not installed (apt-get install qemu-user)"
    old = os.umask(0o022)
    try:
        done = run(["build-llama", "--target", target], env=env)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr[-2000:]
    out = llamabuild.bin_dir(target)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o755 and {t.name: mode(t) for t in out.iterdir()} == \
        {t: 0o755 for t in llamabuild.published(target)}
    prefix = [] if target == "native" else [qemu]
    for tool in llamabuild.TARGETS[target].tools:
        ran = subprocess.run([*prefix, str(out / tool), "--help"], capture_output=True, text=True, timeout=120)
        assert "usage" in (ran.stdout + ran.stderr).lower(), (tool, ran.returncode, ran.stderr[-1000:])
    ran = subprocess.run([*prefix, str(out / "membw"), "1", "1", "1"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr


def test_kill_9_during_build_llama_install_and_concurrent_builds(stub_builds):
    """Killed while installing: the old tools or none, never a part; two builds at once: one builds, the
    other waits for it and uses its result."""
    target, env, log, real = stub_builds
    args = ["build-llama", "--target", "native"]
    rng, landed = random.Random(2), []
    for i in range(KILLS):
        landed.append(kill_at(args + ["--force"] * (i > 0), target, rng, 1.0, "writing the output", env))
        assert not target.exists() or all((target / t).is_file() for t in llamabuild.published("native")), landed[-1]
        assert run(args, env=env).returncode == 0
        assert all(filecmp.cmp(target / t, real / t, shallow=False) for t in llamabuild.TOOLS), landed[-1]
        assert leftovers(target.parent) == [], landed[-1]
    _record("build-llama install", landed)
    shutil.rmtree(target)
    log.write_text("")
    both = [start(args, env=env) for _ in range(2)]  # two at once on an empty cache entry
    assert [p.wait() for p in both] == [0, 0]
    assert sum(line.startswith("--build") for line in log.read_text().splitlines()) == 1  # the second waited
    assert leftovers(target.parent) == []


def test_a_killed_builds_orphaned_compiler_finishes_before_the_next_build_sweeps(stub_builds, tmp_path):
    """kill -9 reaches the build, not its compiler: the orphan writes into the dead build's temporary
    until it exits (CI once found such a directory left behind). The next build waits for it, then sweeps."""
    target, env, _, _ = stub_builds
    events, go = tmp_path / "cc.log", tmp_path / "go"
    # the first compiler waits for `go` (given once the second build says it waits for the lock), later ones not
    (tmp_path / "stub" / "cc").write_text(f'#!/bin/sh\n[ -f {events} ] || first=1\necho "start $$" >> {events}\n'
                                          f'while [ -n "$first" ] && [ ! -f {go} ]; do sleep 0.05; done\n'
                                          f'{shutil.which("cc")} "$@"; rc=$?\necho "done $$" >> {events}\nexit $rc\n')
    (tmp_path / "stub" / "cc").chmod(0o755)
    first = start(["build-llama", "--target", "native"], env=env)
    while not events.is_file():  # the compiler has started, inside the temporary output (it waits there)
        assert first.poll() is None, first.stderr_text()
        time.sleep(0.05)
    first.kill()
    first.wait()
    second = start(["build-llama", "--target", "native"], env=env)
    try:
        while "waiting for pid" not in second.stderr_text():  # the orphan holds the lock until `go`
            assert second.poll() is None, second.stderr_text()
            time.sleep(0.05)
    finally:
        go.touch()
    assert second.wait() == 0, second.stderr_text()
    lines = events.read_text().split()
    orphan = lines[1]
    assert lines[:4] == ["start", orphan, "done", orphan], lines  # the second compiler started after the first ended
    assert leftovers(target.parent) == [] and (target / "membw").is_file()


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
