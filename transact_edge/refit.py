"""A refit at the cut (`prune --reconstruct`): ridge regression of the kept input columns of o_proj and
down_proj, so that the pruned layer reproduces the layer before the cut on calibration tokens.

With X a module's input in the model before the cut (n tokens x C columns), K its kept columns, D the
cut ones and G = X^T X (float64), the kept columns are refit toward their old values:
    W_K' = argmin ||X W^T - X_K W_K'^T||^2 + lam ||W_K' - W_K||^2 = W_K + W_D G_DK (G_KK + lam I)^-1
so nothing cut changes nothing, and lam -> inf is no refit. lam = r * mean diag(G_KK), r chosen per
module from GRID on calibration windows held apart from the fit (no refit is a candidate too: a module
whose held-apart error the refit does not lower keeps its weights); the chosen r is then solved again
on all windows. The inputs are the model's before the cut (refitting on the pruned model's own inputs,
layer after layer, overfits the calibration text: issue 21's probe).
Layer by layer (sparsegpt's driver): the windows' hidden states enter layer 0 once; each layer gets one
Gram object per module (add_batch, solve, free) and hands its outputs, computed before its weights
change, to the next layer. Least-squares compensation at the cut: FLAP (arXiv 2312.11983), SlimGPT.
"""
from __future__ import annotations

import time

import torch

from transact_edge.arch import MHA_INPUT, MLP_INPUT, projection
from transact_edge.plan import LayerPlan
from transact_edge.surgery import unit_rows

GRID = (1e-3, 1e-2, 1e-1)  # ridge strengths, times the mean diagonal of G_KK
HELD_APART = 8              # one calibration window in this many (at least one) chooses the ridge strength


class Gram:
    """X^T X of one module's input, over the fitting windows and over the held-apart ones (float64)."""

    def __init__(self, n: int, device: torch.device):
        self.fit = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.held = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.holding = False  # which of the two add_batch adds to

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.fit.shape[0]).to(torch.float64)  # (tokens, C)
        (self.held if self.holding else self.fit).addmm_(x.T, x)

    def hook(self, module, args) -> None:
        self.add_batch(args[0])


def ridge(w: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor, rel: float) -> torch.Tensor:
    """(out, K) refit kept columns of w (out, C), ridge rel * mean diag(G_KK) toward their old values."""
    w = w.to(torch.float64)
    cut = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    cut[kept] = False
    if not cut.any():
        return w[:, kept].clone()
    g_kk = gram[kept][:, kept]
    lam = rel * g_kk.diagonal().mean()
    rhs = gram[kept][:, cut] @ w[:, cut].T  # (K, out) = G_KD W_D^T
    eye = torch.eye(len(kept), dtype=torch.float64, device=w.device)
    return w[:, kept] + torch.linalg.solve(g_kk + lam * eye, rhs).T


def error(w: torch.Tensor, kept: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """||X w^T - X_K new^T||^2 / ||X w^T||^2 on the tokens of `gram`: the cut module's output error."""
    w = w.to(torch.float64)
    diff = w.clone()
    diff[:, kept] -= new
    return float(((diff @ gram) * diff).sum() / ((w @ gram) * w).sum().clamp_min(1e-300))


def solve(w: torch.Tensor, kept: torch.Tensor, gram: Gram) -> tuple[torch.Tensor, dict]:
    """The refit kept columns and what was chosen: the ridge strength with the least held-apart error."""
    old = w[:, kept].to(torch.float64)
    tried = {"none": error(w, kept, old, gram.held)}
    tried |= {str(r): error(w, kept, ridge(w, kept, gram.fit, r), gram.held) for r in GRID}
    best = min(tried, key=tried.get)
    record = {"ridge": None if best == "none" else float(best), "held_error": tried}
    if best == "none":
        return old, record
    return ridge(w, kept, gram.fit + gram.held, float(best)), record


class _Stop(Exception):
    """Raised by the hook that captures layer 0's inputs: nothing after it needs to run."""


def layer0_inputs(model, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that layer 0 receives, one pair per batch of windows."""
    device = next(model.parameters()).device
    got = []

    def grab(module, args, kwargs):
        got.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model.model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return got


def _layer(layer, p: LayerPlan, head_dim: int, states: dict, group) -> dict:
    """Collect this layer's Grams on its inputs, pass the outputs on (in `states`), refit its weights.
    A module that loses no column needs no Gram: it stays as it is."""
    device = projection(layer, MHA_INPUT).weight.device
    modules = {MHA_INPUT: (projection(layer, MHA_INPUT), unit_rows(p.heads, head_dim).to(device)),
               MLP_INPUT: (projection(layer, MLP_INPUT), torch.tensor(p.channels, device=device))}
    record = {name: {"ridge": None, "nothing_cut": True} for name, (m, kept) in modules.items()
              if len(kept) == m.in_features}
    modules = {name: mk for name, mk in modules.items() if name not in record}
    grams = {name: Gram(m.in_features, device) for name, (m, _) in modules.items()}
    handles = [m.register_forward_pre_hook(grams[name].hook) for name, (m, _) in modules.items()]
    try:
        for part, batches in states.items():
            for g in grams.values():
                g.holding = part == "held"
            states[part] = [(layer(h, **kw), kw) for h, kw in batches]
    finally:
        for h in handles:
            h.remove()
    if group is not None:
        group.sum_([t for g in grams.values() for t in (g.fit, g.held)])
    for name, (m, kept) in modules.items():
        new, record[name] = solve(m.weight, kept, grams.pop(name))
        m.weight[:, kept] = new.to(m.weight.dtype)
    return record


@torch.inference_mode()
def refit(model, plans: list[LayerPlan], windows: torch.Tensor, head_dim: int, batch_size: int = 4,
          group=None) -> dict:
    """Refit, in place, the columns of `model` (before its cut) that `plans` keep; returns the report's
    record: per layer and module the ridge strength chosen (None: left as it was) and the held-apart
    relative output errors of each candidate. With a distributed.Group the Grams sum over processes."""
    t = time.perf_counter()
    held = max(1, windows.shape[0] // HELD_APART)
    parts = {"fit": windows[:-held], "held": windows[-held:]}
    if group is not None:
        parts = {k: group.share(v) for k, v in parts.items()}
    was_training = model.training
    model.eval()
    try:
        states = {k: layer0_inputs(model, v, batch_size) for k, v in parts.items()}
        layers = [_layer(layer, p, head_dim, states, group) for layer, p in zip(model.model.layers, plans)]
    finally:
        model.train(was_training)
    return {"inputs": "the model before the cut", "grid": list(GRID), "fit_windows": windows.shape[0] - held,
            "held_windows": held, "tokens": int(windows.numel()), "layers": layers,
            "seconds": time.perf_counter() - t}
