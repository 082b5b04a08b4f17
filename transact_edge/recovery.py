"""Full-parameter recovery training between shots (the reference recipe, scaled to the budget).

AdamW with betas (0.9, 0.95), linear warmup over the first 10% of steps, then cosine decay;
bf16 autocast on GPUs, float32 on the CPU. The shot's token budget fixes the number of steps.
The loss is distillation from the dense teacher by default, or the LM loss (distill.py). Windows
come from a streamed mixture (traindata.py); a validation loss on a held-apart slice is tracked
every `val_every` steps, so overfitting shows while it happens. Every `checkpoint_seconds` the
whole training state (weights, AdamW moments, step, data position) is handed to a callback that
writes it, so a long shot resumes exactly where it stopped. Launched on several processes
(distributed.py), each trains on its share of every batch through DDP or FSDP2. A batch that does
not fit ends with the largest one that does (memory.py).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from transact_edge import memory
from transact_edge.distill import LossOptions, Teacher, kd_loss, lm_loss, recovery_loss
from transact_edge.distributed import Group, quiet, unwrap, wrap
from transact_edge.traindata import Mixture

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "final", "equal")
FINAL_SHARE = 0.8  # --schedule final: the last shot's share of the tokens; the others split the rest


def tokens_per_shot(total: int, shots: int, schedule: str = "linear") -> list[int]:
    """The total budget spread over the shots.

    linear: shot i gets a share proportional to i (the reference); equal: the same for every shot;
    final: FINAL_SHARE after the last cut, the rest split evenly before it (Minitron found recovery
    after the final cut is what counts).
    """
    if schedule == "equal" or shots == 1:
        weights = [1.0] * shots
    elif schedule == "final":
        weights = [(1 - FINAL_SHARE) / (shots - 1)] * (shots - 1) + [FINAL_SHARE]
    else:
        weights = [float(i) for i in range(1, shots + 1)]
    return [int(total * w / sum(weights) + 1e-9) for w in weights]  # (floats: 0.1 / 1.0 * 1000 is 99.99...)


@dataclass(frozen=True)
class RecoveryOptions:
    loss: LossOptions = field(default_factory=LossOptions)
    batch_size: int = 4                # windows per step and process
    lr: float = 1e-4
    val_every: int = 0                 # steps between validation losses (0: 20 times per shot)
    checkpoint_seconds: float = 300.0  # training state handed to `save` at least this often


# The state saved inside a shot: weights (as save_pretrained names them) and AdamW moments in
# safetensors, the rest as JSON.
WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "training.json"


def save_state(directory: Path, model_sd: dict, optim_sd: dict, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in model_sd.items()}, directory / WEIGHTS)
    save_file({f"{name}/{k}": v.contiguous() for name, s in optim_sd["state"].items() for k, v in s.items()},
              directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps(state | {"param_groups": optim_sd["param_groups"]}))


def load_state(directory: Path) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    model_sd = load_file(directory / WEIGHTS)
    state = json.loads((directory / STATE).read_text())
    optim: dict[str, dict] = {}
    for key, v in load_file(directory / OPTIMIZER).items():
        name, k = key.rsplit("/", 1)
        optim.setdefault(name, {})[k] = v
    return model_sd, {"state": optim, "param_groups": state.pop("param_groups")}, state


def train(model, data: Mixture, steps: int, opts: RecoveryOptions, *, teacher: Teacher | None = None,
          val: torch.Tensor | None = None, desc: str = "recovery", group: Group | None = None,
          sharding: str = "ddp", resume: Path | None = None,
          save: Callable[[Callable[[Path], None]], None] | None = None):
    """`steps` optimizer steps on windows drawn from `data`, batch_size x processes at a time.

    Returns the trained model (a new object after FSDP) and the record of the run. `resume`: a
    directory written through `save`, whose weights, moments, step and data position continue.
    `save(write)`: called every checkpoint_seconds (in every process, since gathering FSDP shards
    is collective); `write(dir)` fills a directory and is only called by the saver.
    """
    if steps == 0:
        return model, {"steps": 0, "tokens": 0}
    if teacher is not None:
        teacher.check_student(model)
    t = _Trainer(model, data, steps, opts, teacher, val, group, sharding, save)
    if resume is not None:
        t.restore(resume)
    t.net.train()
    memory.guarded(lambda: t.run(desc), t.probe, "recovery training", opts.batch_size, data.seq_len, t.device)
    return t.finish()


class _Trainer:
    """One recovery run: the wrapped student, AdamW and its schedule, the record, the checkpoint clock."""

    def __init__(self, model, data: Mixture, steps: int, opts: RecoveryOptions, teacher: Teacher | None,
                 val: torch.Tensor | None, group: Group | None, sharding: str, save):
        self.data, self.steps, self.opts, self.teacher, self.val = data, steps, opts, teacher, val
        self.group, self.sharding, self.save = group, sharding, save
        self.world = group.world if group is not None else 1
        self.device = next(model.parameters()).device
        self.net = wrap(model, sharding, group) if group is not None else model
        self.optim = torch.optim.AdamW(self.net.parameters(), lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.sched = get_cosine_schedule_with_warmup(self.optim, num_warmup_steps=math.ceil(0.1 * steps),
                                                     num_training_steps=steps)
        self.record = {"steps": steps, "loss": opts.loss.kind, "losses": [], "validation": [], "seconds": 0.0}
        self.done = 0
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.val_every = opts.val_every or max(1, steps // 20)

    def restore(self, resume: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd, optim_sd, state = load_state(resume)
        set_state_dict(self.net, self.optim, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        self.done, self.record = state["step"], state["record"]
        self.data.restore(state["data"])
        for _ in range(self.done):
            self.sched.step()

    def batch(self) -> torch.Tensor:
        windows = self.data.take(self.opts.batch_size * self.world)  # (B x world, T): every process draws the same
        return (self.group.share(windows) if self.group is not None else windows).to(self.device)

    def step(self, ids: torch.Tensor) -> float:
        with self.autocast:
            loss = recovery_loss(self.net, ids, self.opts.loss, self.teacher)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean LM loss (and KD loss) of the student on the held-apart windows."""
        self.net.eval()
        lm = kd = 0.0
        for ids in self.val.split(self.opts.batch_size):
            ids = ids.to(self.device)
            with self.autocast:
                logits = self.net(input_ids=ids, use_cache=False).logits
                lm += lm_loss(logits, ids).item() * ids.shape[0]
                if self.teacher is not None:
                    kd += kd_loss(logits, self.teacher.logits(ids), self.opts.loss.temperature).item() * ids.shape[0]
        self.net.train()
        n = self.val.shape[0]
        return {"lm": lm / n, "ppl": math.exp(lm / n)} | ({"kd": kd / n} if self.teacher is not None else {})

    def checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.net, self.optim,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {"step": self.done, "record": self.record, "data": self.data.state()}
        self.save(lambda d: save_state(d, model_sd, optim_sd, state))

    def due(self, last: float) -> bool:
        """Time for a checkpoint, as process 0's clock says (every process must agree)."""
        flag = torch.tensor([time.monotonic() - last >= self.opts.checkpoint_seconds], device=self.device)
        if self.group is not None:
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def run(self, desc: str) -> None:
        bar = tqdm(total=self.steps, initial=self.done, desc=desc, unit="step", leave=False, disable=quiet(self.group))
        last, start = time.monotonic(), time.perf_counter()
        while self.done < self.steps:
            self.record["losses"].append(self.step(self.batch()))
            self.sched.step()
            self.done += 1
            if self.val is not None and (self.done % self.val_every == 0 or self.done == self.steps):
                self.record["validation"].append({"step": self.done} | self.validate())
            post = {"loss": f"{self.record['losses'][-1]:.3f}", "lr": f"{self.sched.get_last_lr()[0]:.2e}"}
            if self.record["validation"]:
                post["val"] = f"{self.record['validation'][-1]['lm']:.3f}"
            bar.set_postfix(post)
            bar.update()
            if self.save is not None and self.done < self.steps and self.due(last):
                self.record["seconds"] += time.perf_counter() - start
                self.checkpoint()
                last, start = time.monotonic(), time.perf_counter()
        self.record["seconds"] += time.perf_counter() - start
        bar.close()

    def probe(self, b: int) -> None:
        """Two whole steps at batch b: the second runs with AdamW's moments allocated, as training does.
        Only called on the way to an error, so the weights these steps change are never saved."""
        ids = self.data.take(b).to(self.device)
        try:
            self.step(ids)
            self.step(ids)
        finally:
            self.optim.zero_grad(set_to_none=True)

    def finish(self):
        """The student (unwrapped) and the record of the run."""
        self.net.eval()
        model = unwrap(self.net, self.sharding) if self.group is not None else self.net
        record, tokens = self.record, self.steps * self.opts.batch_size * self.world * self.data.seq_len
        losses = record.pop("losses")
        record |= {"tokens": tokens, "loss_first": losses[0], "loss_last": losses[-1],
                   "loss_curve": losses[:: max(1, len(losses) // 50)],
                   "tokens_per_s": tokens / record["seconds"] if record["seconds"] else None,
                   "processes": self.world, "sharding": self.sharding if self.group is not None else None,
                   "data": self.data.report()}
        if self.teacher is not None:
            record["teacher"] = {"params": self.teacher.params, "bytes_per_process": self.teacher.bytes, "placement":
                                 "a frozen replica in every process" if self.group is not None else "one frozen copy"}
        log.info("recovery (%s): %d steps, %d tokens, loss %.3f -> %.3f", self.opts.loss.kind, self.steps, tokens,
                 losses[0], losses[-1])
        return model, record
