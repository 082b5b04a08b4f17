"""Shared bits of the benchmark scripts: where and when a result was measured, and peak memory."""
from __future__ import annotations

import datetime
import os
import platform
import sys


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def peak_rss_mib() -> float:
    from transact_edge.memory import own_peak_rss_mib
    return own_peak_rss_mib()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
