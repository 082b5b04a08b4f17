"""What every device offers: stage files, run a command, report its peak memory, clean up."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    rc: int
    stdout: str
    stderr: str
    peak_rss_mib: float | None      # of the process that ran (for qemu: the emulator)


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
