"""Where a benchmark runs: this machine, an ssh board, an Android phone over adb, or arm64 under qemu.

    open_device("local") | open_device("ssh://pi@raspberrypi.local:22") | open_device("adb:SERIAL")
    | open_device("qemu-arm64")

Every device stages files into its own scratch directory, runs argv there, reports the exit status,
output and the peak RSS of the process it ran, and removes everything it staged when closed, even
after an error. Mobile profiles fix threads, context and a memory cap by name.
"""
from __future__ import annotations

from dataclasses import dataclass

from transact_edge.errors import UserError
from transact_edge.devices.base import Device, RunResult
from transact_edge.devices.local import Local, Qemu
from transact_edge.devices.remote import Adb, Ssh

__all__ = ["Device", "RunResult", "PROFILES", "Profile", "open_device"]


@dataclass(frozen=True)
class Profile:
    threads: int
    n_ctx: int          # the largest context the profile allows (prompt + generation + depth)
    mem_mib: int        # memory an app may use on it


PROFILES: dict[str, Profile] = {
    "pi4-4gb": Profile(threads=4, n_ctx=2048, mem_mib=3072),
    "pi5-8gb": Profile(threads=4, n_ctx=4096, mem_mib=6144),
    "jetson-orin-nano": Profile(threads=6, n_ctx=4096, mem_mib=6144),
    "phone-midrange": Profile(threads=4, n_ctx=2048, mem_mib=2048),   # 6 GB phone, app budget
    "phone-flagship": Profile(threads=4, n_ctx=4096, mem_mib=4096),   # the big cores of a 12 GB phone
}


def open_device(spec: str, ssh_options: tuple[str, ...] = (), target: str | None = None) -> Device:
    """A connected device from its spec; `target` overrides the llama.cpp build it runs."""
    if spec == "local":
        device: Device = Local()
    elif spec == "qemu-arm64":
        device = Qemu()
    elif spec.startswith("ssh://"):
        device = Ssh(spec, ssh_options)
    elif spec == "adb" or spec.startswith("adb:"):
        device = Adb(spec.partition(":")[2] or None)
    else:
        raise UserError(f"unknown device {spec!r} (local, ssh://user@host[:port], adb[:serial], qemu-arm64)")
    device.open()
    if target:
        device.target = target
    return device
