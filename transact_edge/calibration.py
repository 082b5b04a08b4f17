"""Forward-only statistics of the transitional activations (TransAct, arXiv 2407.05690, §3).

A pre-forward hook on each layer's o_proj sees the concatenated attention heads; one on down_proj
sees act(gate(x)) * up(x). Each hook adds the per-channel sum of squares of its input, in float64,
over every token of every batch: s_j^2 = sum_t a_j(t)^2. Nothing else is kept.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from transact_edge import memory
from transact_edge.arch import HEAD_COLS, HEAD_ROWS, KV_ROWS, MHA_INPUT, MLP_COLS, MLP_INPUT, MLP_ROWS, projection
from transact_edge.distributed import quiet


@dataclass
class Stats:
    mha: list[torch.Tensor]  # per layer, (n_head * head_dim,) float64 sums of squares
    mlp: list[torch.Tensor]  # per layer, (ffn_dim,) float64 sums of squares
    tokens: int


def accumulator(acc: torch.Tensor):
    def hook(module, args):
        x = args[0].detach().reshape(-1, acc.numel()).to(torch.float64)  # (B*T, C)
        acc.add_(x.square().sum(dim=0))  # (einsum in float64 is ~25x slower on CPU)
    return hook


@contextmanager
def hooked_layer(layer, device=None):
    """(mha, mlp) float64 sums of squares of one layer's transitional activations (the inputs of o_proj and
    down_proj), added to by every forward while the context lasts; the hooks are removed on exit."""
    sums, handles = [], []
    for name in (MHA_INPUT, MLP_INPUT):
        module = projection(layer, name)
        sums.append(torch.zeros(module.in_features, dtype=torch.float64, device=device))
        handles.append(module.register_forward_pre_hook(accumulator(sums[-1])))
    try:
        yield tuple(sums)
    finally:
        for h in handles:
            h.remove()


@contextmanager
def hooked(model) -> Stats:
    """Hooks on every layer's transitional activations; removed on exit even after an error."""
    device = next(model.parameters()).device  # sums stay where the activations are
    with ExitStack() as stack:
        per_layer = [stack.enter_context(hooked_layer(layer, device)) for layer in model.model.layers]
        yield Stats([mha for mha, _ in per_layer], [mlp for _, mlp in per_layer], 0)


@torch.inference_mode()
def collect(model, windows: torch.Tensor, batch_size: int = 8, desc: str = "salience", group=None) -> Stats:
    """Run `windows` (N, T) through the model in batches and return the summed statistics.

    With a distributed.Group, each process runs its share and the sums are over all processes.
    """
    device = next(model.parameters()).device
    if group is not None:
        windows = group.share(windows)
    was_training = model.training
    model.eval()
    forward = lambda batch: model.model(input_ids=batch.to(device), use_cache=False)  # noqa: E731 - no LM head

    with hooked(model) as stats:
        def run() -> None:
            for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False,
                              disable=quiet(group)):
                forward(batch)
                stats.tokens += batch.numel()

        memory.guarded(run, lambda b: forward(windows[:b]), "salience", batch_size, windows.shape[1], device)
    model.train(was_training)
    if group is not None:
        group.sum_(stats.mha + stats.mlp)
        stats.tokens *= group.world
    return Stats([m.cpu() for m in stats.mha], [f.cpu() for f in stats.mlp], stats.tokens)


# structures are rows of these and columns of those; keyed q, k, v, gate, up / o, down
ROWS = {name.removesuffix("_proj"): name for name in (*HEAD_ROWS, *KV_ROWS, *MLP_ROWS)}
COLS = {name.removesuffix("_proj"): name for name in (*HEAD_COLS, *MLP_COLS)}


def weight_products(model, fn=None, windows: torch.Tensor | None = None, batch_size: int = 8,
                    group=None) -> list[dict[str, torch.Tensor]]:
    """Per layer, fn(weight) summed over each row of q/k/v/gate/up and each column of o/down (bias
    elements join their rows), in float64. With `windows` and no fn: fn = |grad x weight|, the
    language-model loss's gradient summed over the calibration batches (only these weights get one;
    with a distributed.Group, over every process's share of the batches).
    """
    layers = model.model.layers
    modules = lambda layer, table: {k: projection(layer, name) for k, name in table.items()}  # noqa: E731
    if windows is not None:
        device = next(model.parameters()).device
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        wanted = [p for layer in layers for m in {**modules(layer, ROWS), **modules(layer, COLS)}.values()
                  for p in m.parameters()]
        for p in wanted:
            p.requires_grad_(True)
            p.grad = None
        was_training = model.training
        model.eval()
        if group is not None:
            windows = group.share(windows)
        try:
            for batch in tqdm(windows.split(batch_size), desc="taylor", unit="batch", leave=False,
                              disable=quiet(group)):
                batch = batch.to(device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        finally:
            model.train(was_training)
            for p, f in flags.items():
                p.requires_grad_(f)
        if group is not None:
            group.sum_([p.grad for p in wanted])
        fn = lambda w: (w.grad.double() * w.detach().double()).abs()  # noqa: E731
    out = []
    with torch.no_grad():
        for layer in layers:
            sums = {}
            for key, m in modules(layer, ROWS).items():
                sums[key] = fn(m.weight).sum(dim=1)
                if m.bias is not None:
                    sums[key] = sums[key] + fn(m.bias)
            for key, m in modules(layer, COLS).items():
                sums[key] = fn(m.weight).sum(dim=0)
            out.append({k: v.cpu() for k, v in sums.items()})
    if windows is not None:
        for p in wanted:
            p.grad = None
    return out
