"""Memory: out of memory -> the largest batch that fits, found by trying, instead of a crash; and
this process's peak resident set.

When a batch does not fit (CUDA's OutOfMemoryError, or the CPU allocator's failure under a memory
limit), the step's tensors are released and smaller batches are tried on the same windows, halving
the interval each time; the error then names the largest batch that ran. The search runs the real
step (for training: two optimizer steps, so that AdamW's state is there as it is in training) and
always ends in that error, so nothing it changes is kept.
"""
from __future__ import annotations

import gc
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
