"""Memory: out of memory -> the largest batch that fits, found by trying, instead of a crash; and
this process's peak resident set.

When a batch does not fit (CUDA's OutOfMemoryError, or the CPU allocator's failure under a memory
limit), the step's tensors are released and smaller batches are tried on the same windows, halving
the interval each time; the error then names the largest batch that ran. The search runs the real
step (for training: two optimizer steps, so that AdamW's state is there as it is in training) and
always ends in that error, so nothing it changes is kept.
"""
from __future__ import annotations

import ctypes
import gc
import mmap
import os
from typing import Callable, TypeVar

import torch

from transact_edge.errors import UserError

CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
T = TypeVar("T")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and CPU_OOM in str(e))


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(step: Callable[[int], None], batch: int) -> bool:
    try:
        step(batch)
        return True
    except Exception as e:  # noqa: BLE001 - anything but running out of memory is re-raised
        if not is_oom(e):
            raise
    finally:
        release()
    return False


def largest_batch(step: Callable[[int], None], failed: int) -> int:
    """The largest b < failed for which step(b) runs (0: not even one window)."""
    lo, hi = 0, failed  # step(lo) fits (or lo == 0), step(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(step, mid) else (lo, mid)
    return lo


def too_big(what: str, batch: int, seq_len: int, device: torch.device, best: int) -> UserError:
    where = f"{device.type} memory" + (f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
                                       if device.type == "cuda" else "")
    if best == 0:
        return UserError(f"{what}: not even one window of {seq_len} tokens fits in {where}; use a shorter "
                         f"--seq-len, or shard the model over GPUs with --launcher accelerate --sharding fsdp")
    return UserError(f"{what}: a batch of {batch} windows x {seq_len} tokens does not fit in {where}; "
                     f"the largest that fits is {best}: rerun with --batch-size {best}")


def guarded(run: Callable[[], T], step: Callable[[int], None], what: str, batch: int, seq_len: int,
            device: torch.device) -> T:
    """run(); if it runs out of memory, raise too_big with the largest batch for which step(b) runs."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
    release()  # the failed step's tensors went with the exception
    raise too_big(what, batch, seq_len, device, largest_batch(step, batch))


def own_peak_rss_mib() -> float:
    """This process's peak RSS since its exec (VmHWM; getrusage would include a forking parent's)."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def _file_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of files (torch maps safetensors files rw-p:
    copy-on-write, so a page given back is read again from the file if touched)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/") and parts[1].endswith("p"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


def drop_file_pages(tensors: list[torch.Tensor]) -> int:
    """Let the kernel take back the resident pages of tensors that are views of a file mapping,
    once they are no longer needed (the weights of a layer just cut). The mapping outlives them (other
    tensors view the same file), and its touched pages would otherwise count as ours until the end.
    Only whole pages inside the tensors are given back, and they are the file's own bytes (or a copy of
    a tensor no one will read again); returns the bytes given back."""
    if not hasattr(os, "sysconf") or not os.path.exists("/proc/self/maps"):
        return 0
    page, maps, libc, given = mmap.PAGESIZE, _file_maps(), ctypes.CDLL(None, use_errno=True), 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(s <= start and end <= e for s, e in maps):
            continue
        first, last = -(-start // page) * page, end // page * page  # whole pages inside this tensor only
        if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED) == 0:
            given += last - first
    return given
