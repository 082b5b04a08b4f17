"""This machine, and arm64 binaries on it under qemu-user."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

from ..errors import UserError
from .base import Device, RunResult


class Local(Device):
    name = "local"
    prefix: list[str] = []

    def put(self, path: Path) -> str:
        return str(Path(path).resolve())

    def cpu_count(self) -> int:
        return os.cpu_count() or 1

    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        """Run argv; peak RSS comes from wait4 on this very child, so runs never mix."""
        proc = subprocess.Popen(self.prefix + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out: dict[str, bytes] = {}
        readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()))
                   for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for t in readers:
            t.start()
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        for t in readers:
            t.join()
        return RunResult(proc.returncode, out["stdout"].decode(errors="replace"),
                         out["stderr"].decode(errors="replace"), usage.ru_maxrss / 1024)


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
