"""Full-parameter recovery training between shots (the reference recipe, scaled to the budget).

AdamW with betas (0.9, 0.95), linear warmup over the first 10% of steps, then cosine decay;
bf16 autocast on GPUs, float32 on the CPU. The shot's token budget fixes the number of steps.
Launched on several processes (distributed.py), each trains on its share of the windows through
DDP or FSDP2. A batch that does not fit ends with the largest one that does (memory.py).
"""
from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import memory
from .distributed import Group, quiet, unwrap, wrap

log = logging.getLogger(__name__)


def tokens_per_shot(total: int, shots: int) -> list[int]:
    """The total budget spread over the shots, rising linearly (shot i gets a share proportional to i)."""
    weights = range(1, shots + 1)
    return [total * w // sum(weights) for w in weights]


def train(model, windows: torch.Tensor, batch_size: int, lr: float, seed: int, desc: str = "recovery",
          group: Group | None = None, sharding: str = "ddp"):
    """One pass over `windows` (N, T) in batches of `batch_size` (per process); returns the trained
    model (a new object after FSDP) and the loss and throughput."""
    if group is not None:  # every process must take the same number of steps
        windows = group.share(windows[: windows.shape[0] - windows.shape[0] % group.world])
    steps = math.ceil(windows.shape[0] / batch_size)
    if steps == 0:
        return model, {"steps": 0, "tokens": 0}
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    net = wrap(model, sharding, group) if group is not None else model
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=math.ceil(0.1 * steps), num_training_steps=steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    net.train()
    losses: list[float] = []

    def step(batch: torch.Tensor) -> float:
        batch = batch.to(device)
        with autocast:
            loss = net(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def run() -> None:
        bar = tqdm(windows.split(batch_size), desc=desc, unit="step", leave=False, disable=quiet(group))
        for batch in bar:
            losses.append(step(batch))
            sched.step()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")

    def probe(b: int) -> None:
        """Two whole steps at batch b: the second runs with AdamW's moments allocated, as training does.
        Only called on the way to an error, so the weights these steps change are never saved."""
        try:
            step(windows[:b])
            step(windows[:b])
        finally:
            opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    memory.guarded(run, probe, "recovery training", batch_size, windows.shape[1], device)
    net.eval()
    model = unwrap(net, sharding) if group is not None else net
    seconds = time.perf_counter() - start
    world = group.world if group is not None else 1
    tokens = windows.numel() * world
    log.info("recovery: %d steps, %d tokens, loss %.3f -> %.3f, %.0f tok/s",
             steps, tokens, losses[0], losses[-1], tokens / seconds)
    return model, {"steps": steps, "tokens": tokens, "loss_first": losses[0], "loss_last": losses[-1],
                   "seconds": seconds, "tokens_per_s": tokens / seconds, "processes": world,
                   "sharding": sharding if group is not None else None}
