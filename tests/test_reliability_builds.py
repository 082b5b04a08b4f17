"""Faults `transact-edge build-llama` meets, tried on real processes (issue 15): a fresh machine's first
build publishes tools that run from where they were published; kill -9 while installing leaves the old tools
or none; two builds at once build once; a killed build's orphaned compiler finishes before the next sweeps.
"""
from __future__ import annotations

import filecmp
import os
import random
import shutil
import subprocess
import time

import pytest

from helpers import KILLS, kill_at, leftovers, record_kills, run, start
from transact_edge import llamabuild

pytestmark = pytest.mark.reliability


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
    record_kills("build-llama install", landed)
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
