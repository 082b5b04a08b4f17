"""Full-parameter recovery training between shots (the reference recipe, scaled to the budget).

AdamW with betas (0.9, 0.95), linear warmup over the first 10% of steps, then cosine decay;
bf16 autocast on GPUs, float32 on the CPU. The shot's token budget fixes the number of steps.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

log = logging.getLogger(__name__)


def tokens_per_shot(total: int, shots: int) -> list[int]:
    """The total budget spread over the shots, rising linearly (shot i gets a share proportional to i)."""
    weights = range(1, shots + 1)
    return [total * w // sum(weights) for w in weights]


def train(model, windows: torch.Tensor, batch_size: int, lr: float, seed: int, desc: str = "recovery") -> dict:
    """One pass over `windows` (N, T) in batches of `batch_size`; returns loss and throughput."""
    steps = math.ceil(windows.shape[0] / batch_size)
    if steps == 0:
        return {"steps": 0, "tokens": 0}
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=math.ceil(0.1 * steps), num_training_steps=steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    start, losses = time.perf_counter(), []
    bar = tqdm(windows.split(batch_size), desc=desc, unit="step", leave=False)
    for batch in bar:
        batch = batch.to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    model.eval()
    seconds = time.perf_counter() - start
    tokens = windows.numel()
    log.info("recovery: %d steps, %d tokens, loss %.3f -> %.3f, %.0f tok/s",
             steps, tokens, losses[0], losses[-1], tokens / seconds)
    return {"steps": steps, "tokens": tokens, "loss_first": losses[0], "loss_last": losses[-1],
            "seconds": seconds, "tokens_per_s": tokens / seconds}
