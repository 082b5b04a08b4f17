"""Devices reached through a client program: Linux boards over OpenSSH, Android phones over adb.

Both stage files into a fresh `mktemp -d` directory and run commands under base.WRAPPER, so peak
memory is measured on the device without extra tools there.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from transact_edge.errors import UserError
from transact_edge.devices.base import WRAPPER, Device, RunResult, unwrap

TARGET_OF_MACHINE = {"aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu", "x86_64": "native"}


class Remote(Device):
    base = "/tmp"
    workdir: str | None = None

    def _shell(self, command: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def _push(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> str:
        if proc.returncode:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()
            raise UserError(f"{self.name}: {what} failed: {last[-1] if last else f'exit {proc.returncode}'}")
        return proc.stdout.strip()

    def open(self) -> None:
        self.machine = self._check(self._shell("uname -m", timeout=30), "connecting")
        self.target = self._target()
        self.workdir = self._check(self._shell(f"mktemp -d {self.base}/transact-edge.XXXXXX", timeout=30),
                                   "making a scratch directory")

    def _target(self) -> str:
        return TARGET_OF_MACHINE.get(self.machine, self.machine)

    def put(self, path: Path) -> str:
        remote = f"{self.workdir}/{Path(path).name}"
        self._push(Path(path), remote)
        if os.access(path, os.X_OK):
            self._check(self._shell(f"chmod +x {shlex.quote(remote)}"), "chmod")
        return remote

    def run(self, argv: list[str], timeout: float | None = None) -> RunResult:
        command = (f"cd {shlex.quote(self.workdir)} && sh -c {shlex.quote(WRAPPER)} sh "
                   + " ".join(shlex.quote(a) for a in argv))
        proc = self._shell(command, timeout=timeout)
        result = unwrap(proc.stdout, proc.stderr)
        if result is None:
            self._check(proc, "running the benchmark")
            raise UserError(f"{self.name}: the command ended without its exit status")
        return result

    def close(self) -> None:
        if self.workdir:
            self._shell(f"rm -rf {shlex.quote(self.workdir)}", timeout=60)
            self.workdir = None


class Ssh(Remote):
    """ssh://user@host[:port] through the system's OpenSSH client (keys from ssh-agent, ~/.ssh/config
    or `--ssh-option IdentityFile=...`, passed as -o); never prompts."""

    def __init__(self, spec: str, options: tuple[str, ...] = ()):
        url = urlsplit(spec)
        if not url.hostname:
            raise UserError(f"bad ssh device {spec!r} (ssh://user@host[:port])")
        if shutil.which("ssh") is None:
            raise UserError("the OpenSSH client (ssh) is not installed")
        self.dest = f"{url.username}@{url.hostname}" if url.username else url.hostname
        self.port = str(url.port or 22)
        self.name = f"ssh://{self.dest}:{self.port}"
        self.options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        for opt in options:
            self.options += ["-o", opt]

    def _shell(self, command: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["ssh", *self.options, "-p", self.port, self.dest, command],
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UserError(f"{self.name}: no answer within {timeout:.0f} s") from None

    def _push(self, local: Path, remote: str) -> None:
        """Streamed through `cat` over ssh: works on boards without an sftp server (dropbear, minimal images)."""
        with open(local, "rb") as f:
            proc = subprocess.run(["ssh", *self.options, "-p", self.port, self.dest, f"cat > {shlex.quote(remote)}"],
                                  stdin=f, capture_output=True)
        self._check(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                                proc.stderr.decode(errors="replace")), f"copying {local.name}")


class Adb(Remote):
    """adb[:serial]: an Android phone; files go to /data/local/tmp. The adb program is $ADB or `adb`."""
    base = "/data/local/tmp"

    def __init__(self, serial: str | None):
        self.adb = os.environ.get("ADB", "adb")
        if shutil.which(self.adb) is None:
            raise UserError(f"adb not found ({self.adb}): install Android platform-tools or set ADB")
        self.serial = ["-s", serial] if serial else []
        self.name = f"adb:{serial}" if serial else "adb"

    def open(self) -> None:
        state = subprocess.run([self.adb, *self.serial, "get-state"], capture_output=True, text=True, timeout=30)
        if state.returncode or state.stdout.strip() != "device":
            msg = (state.stderr or state.stdout).strip().splitlines()
            raise UserError(f"{self.name}: no adb device ({msg[-1] if msg else 'get-state failed'})")
        super().open()

    def _target(self) -> str:
        return "android-arm64" if self.machine in ("aarch64", "arm64") else self.machine

    def _shell(self, command: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.adb, *self.serial, "shell", command], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UserError(f"{self.name}: no answer within {timeout:.0f} s") from None

    def _push(self, local: Path, remote: str) -> None:
        self._check(subprocess.run([self.adb, *self.serial, "push", str(local), remote], capture_output=True,
                                   text=True), f"pushing {local.name}")
