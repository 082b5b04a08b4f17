"""This machine, and arm64 binaries on it under qemu-user."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from transact_edge.errors import UserError
from transact_edge.devices.base import WRAPPER, Device, RunResult, unwrap


class Local(Device):
    name = "local"
    prefix: list[str] = []

    def put(self, path: Path) -> str:
        return str(Path(path).resolve())

    def cpu_count(self) -> int:
        return os.cpu_count() or 1

    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        """Run argv under the VmHWM wrapper (base.WRAPPER); its own peak RSS, never the parent's."""
        try:
            proc = subprocess.run(["sh", "-c", WRAPPER, "sh", *self.prefix, *argv], capture_output=True,
                                  text=True, errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UserError(f"{self.name}: {Path(argv[0]).name} did not finish within {timeout:.0f} s") from None
        result = unwrap(proc.stdout, proc.stderr)
        return result or RunResult(proc.returncode, proc.stdout, proc.stderr, None)


class Qemu(Local):
    """The aarch64-linux-gnu build (static) under qemu-aarch64: proves the GGUF runs on arm64."""
    name = "qemu-arm64"
    target = "aarch64-linux-gnu"
    emulated = True

    def open(self) -> None:
        qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
        if qemu is None:
            raise UserError("qemu-aarch64 not found (Debian: apt-get install qemu-user)")
        self.prefix = [qemu]
