"""Several processes (GPUs): torch.distributed, started by `accelerate launch` or `torchrun`.

`prune --launcher accelerate --processes N` runs the same command again under the launcher, which
starts N processes and gives each RANK, WORLD_SIZE and LOCAL_RANK; `accelerate launch -m
transact_edge prune ...` or `torchrun --nproc_per_node N -m transact_edge prune ...` typed by hand
does the same. Each process then holds the whole model between shots (salience and surgery need
all of a layer) and works on its share of the windows:
- salience: the activation statistics are summed over the processes (process 0's sum is broadcast,
  so every process cuts exactly the same heads and channels);
- recovery: PyTorch's DDP (weights replicated), or FSDP2 (`fully_shard` per decoder layer: weights,
  gradients and AdamW state sharded; for models whose training state does not fit on one GPU); the
  same token budget and learning-rate schedule as one process, with N x --batch-size per step;
- process 0 alone evaluates and writes checkpoints; the others wait for it.
NCCL on GPUs, gloo on the CPU (which is how the tests run two processes without a GPU).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from transact_edge.errors import UserError

# launcher -> (module that must be importable, how to install it, arguments before "-m transact_edge")
LAUNCHERS = {
    "accelerate": ("accelerate.commands.launch", "pip install accelerate",
                   lambda n: ["--num_processes", str(n), "--num_machines", "1", "--multi_gpu",
                              "--mixed_precision", "no", "--dynamo_backend", "no", "--module"]),
    "torchrun": ("torch.distributed.run", "it ships with PyTorch",
                 lambda n: ["--standalone", "--nproc_per_node", str(n), "--module"]),
}
SHARDING = ("ddp", "fsdp")
LAUNCH_FLAGS = ("--launcher", "--processes")  # consumed by the parent, never passed to the workers


def launch(launcher: str, processes: int, argv: list[str]) -> int:
    """Run `transact-edge argv` (without the launch flags) under the launcher; its exit status."""
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown --launcher {launcher!r} (choose from {', '.join(LAUNCHERS)})")
    module, install, args = LAUNCHERS[launcher]
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is missing or broken
        found = False
    if not found:
        raise UserError(f"--launcher {launcher}: {module} is not installed ({install})")
    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}")
    cmd = [sys.executable, "-m", module, *args(processes), "transact_edge", *strip_launch_flags(argv)]
    return subprocess.run(cmd, env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode


def strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(a)
    return out


@dataclass
class Group:
    """This process's place among the launched ones."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def share(self, windows: torch.Tensor) -> torch.Tensor:
        """Every world-th window, from this rank's offset."""
        return windows[self.rank::self.world]

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In place: the sum over all processes, as process 0 computed it, in every process."""
        for t in tensors:
            dist.reduce(t, dst=0)
            dist.broadcast(t, src=0)

    def barrier(self) -> None:
        dist.barrier()


def launched_processes() -> int:
    """How many processes the launcher that started this one started (1: no launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def first_process() -> bool:
    """Process 0 of a launched run, or a run without a launcher: the one that owns the output."""
    return os.environ.get("RANK", "0") == "0"


def quiet(group: Group | None) -> bool:
    """Progress bars are process 0's alone."""
    return group is not None and not group.main


def join(device: str) -> Group | None:
    """Join the launched processes (None when this process was not started by a launcher)."""
    world = launched_processes()
    if world == 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    gpu = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not gpu:
        raise UserError("--device cuda: no GPU is visible to this process")
    if gpu:
        torch.cuda.set_device(local)
    group = Group(rank, world, torch.device("cuda", local) if gpu else torch.device("cpu"))
    if not dist.is_initialized():
        dist.init_process_group(group.backend, timeout=timedelta(hours=2), device_id=group.device if gpu else None)
    return group


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model, sharding: str, group: Group):
    """The model as the engine trains it: DDP, or FSDP2 with one unit per decoder layer."""
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[group.device.index] if group.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def unwrap(trained, sharding: str):
    """A plain model with the trained weights, whole, in every process."""
    if sharding == "ddp":
        return trained.module  # DDP shares the module's parameters
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from transact_edge.modeling import assemble

    sd = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    buffers = dict(trained.named_buffers())
    return assemble(trained.config, sd, buffers, trained.training)
