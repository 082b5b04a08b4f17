"""What every device offers: stage files, run a command, report its peak memory, clean up.

Every device runs its command under the same small POSIX-sh wrapper, which samples the child's
VmHWM (the peak resident set of its own address space, which only grows) from /proc every 0.1 s
until it exits. Not getrusage/wait4: Linux carries ru_maxrss across execve, so a child forked from
a large Python process would report the parent's size as its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# "$@" runs in the background; its VmHWM is read until /proc shows no memory for it (a zombie has
# none), then its exit status and the last VmHWM go to stderr as one marked line.
WRAPPER = ('"$@" & p=$!; h=0; '
           'while v=$(sed -n "s/^VmHWM:[^0-9]*\\([0-9]*\\).*/\\1/p" /proc/$p/status 2>/dev/null) '
           '&& [ -n "$v" ]; do h=$v; sleep 0.1; done; '
           'wait $p; rc=$?; echo "transact-edge-run rc=$rc peak_kib=$h" >&2; exit $rc')
MARK = re.compile(r"^transact-edge-run rc=(\d+) peak_kib=(\d+)\s*$", re.M)


@dataclass
class RunResult:
    rc: int
    stdout: str
    stderr: str
    peak_rss_mib: float | None      # of the process that ran (for qemu: the emulator)


def unwrap(stdout: str, stderr: str) -> "RunResult | None":
    """The RunResult of a wrapped command, or None when its marked line is missing."""
    marks = MARK.findall(stderr)
    if not marks:
        return None
    rc, kib = map(int, marks[-1])
    return RunResult(rc, stdout, MARK.sub("", stderr), kib / 1024 if kib else None)


class Device:
    name = "device"
    target = "native"               # the llama.cpp build (llamabuild.TARGETS) its binaries come from
    emulated = False                # times are not the hardware's own

    def open(self) -> None:
        """Connect and make a scratch directory."""

    def put(self, path: Path) -> str:
        """Stage a local file on the device; return its path there."""
        raise NotImplementedError

    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        raise NotImplementedError

    def cpu_count(self) -> int:
        res = self.run(["nproc"])
        return int(res.stdout.strip()) if res.rc == 0 and res.stdout.strip().isdigit() else 1

    def close(self) -> None:
        """Remove everything staged on the device."""

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
