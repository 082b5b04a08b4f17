#!/usr/bin/env python3
"""adb-standin: NOT adb and NOT a phone. An adb-compatible stand-in that runs `adb shell` commands
on this machine, with /data/local/tmp mapped under $ADB_STANDIN_ROOT, so the adb device's staging,
running, parsing and clean-up can be tested where no Android phone is attached. Serial: standin-1.
"""
import os
import shutil
import subprocess
import sys

ROOT = os.environ["ADB_STANDIN_ROOT"]
SERIAL = "standin-1"


def local(path: str) -> str:
    return path.replace("/data/local/tmp", os.path.join(ROOT, "data/local/tmp"))


args = sys.argv[1:]
if args[:1] == ["-s"]:
    if args[1] != SERIAL:
        sys.exit(print(f"adb: device '{args[1]}' not found", file=sys.stderr) or 1)
    args = args[2:]
if args == ["get-state"]:
    print("device")
elif args[:1] == ["shell"]:  # paths in the output are shown as the phone would show them
    proc = subprocess.run(["sh", "-c", local(" ".join(args[1:]))], capture_output=True, text=True)
    sys.stdout.write(proc.stdout.replace(ROOT, ""))
    sys.stderr.write(proc.stderr.replace(ROOT, ""))
    sys.exit(proc.returncode)
elif args[:1] == ["push"]:
    shutil.copy2(args[1], local(args[2]))
    print(f"{args[1]}: 1 file pushed")
else:
    sys.exit(print(f"adb-standin: unsupported {args}", file=sys.stderr) or 1)
