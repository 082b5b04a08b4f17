"""Importance of every query head, KV group and MLP channel: TransAct's and the baselines'.

acts (TransAct): channel salience s_j = sqrt(sum_t a_j(t)^2) of the transitional activations. A
head's score is mean_j s_j + alpha * max_j s_j over its head_dim channels, alpha = 10 / head_dim
(the reference code's rule). GQA: a KV group's score is the sum of the scores of the query heads
that read it (query head h reads KV head h // (n_head / n_kv_head)).

Baselines, scored over the same structures (a head: its q rows and o_proj columns; a KV group: its
k and v rows plus its query heads; a channel: its gate and up rows and down_proj column):
magnitude = the L2 norm of those weights; taylor = sum over those weights of |dL/dw * w|, the
gradient summed over the calibration batches (LLM-Pruner's element-wise first-order criterion);
random = seeded uniform draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from transact_edge.calibration import collect, weight_products
from transact_edge.shapes import LayerShape


@dataclass
class Scores:
    """Per layer: (n_head,) query heads, (n_kv_head,) KV groups, (ffn_dim,) MLP channels; higher = keep."""
    heads: list[torch.Tensor]
    groups: list[torch.Tensor]
    channels: list[torch.Tensor]


def channel_scores(sum_sq: torch.Tensor) -> torch.Tensor:
    return sum_sq.sqrt()


def head_scores(channels: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head,) from the (n_head * head_dim,) channel scores of one layer's attention output."""
    per_head = channels.view(n_head, -1)  # (n_head, head_dim)
    alpha = 10.0 / per_head.shape[1]
    return per_head.mean(dim=1) + alpha * per_head.amax(dim=1)


def group_scores(heads: torch.Tensor, n_kv_head: int) -> torch.Tensor:
    """(n_kv_head,) sums of the query-head scores of each KV group."""
    return heads.view(n_kv_head, -1).sum(dim=1)


def summary(x: torch.Tensor) -> dict[str, float]:
    """Small description of a score vector for transact.json."""
    q = torch.quantile(x.double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    return {"min": float(q[0]), "median": float(q[1]), "max": float(q[2]), "mean": float(x.double().mean())}


def acts(model, windows: torch.Tensor, shapes: list[LayerShape], batch_size: int, seed: int,
         group=None) -> Scores:
    """TransAct: activation statistics of the transitional activations (forward only)."""
    stats = collect(model, windows, batch_size, group=group)
    return from_stats(stats, shapes)


def from_stats(stats, shapes: list[LayerShape]) -> Scores:
    heads = [head_scores(channel_scores(m), s.n_head) for s, m in zip(shapes, stats.mha)]
    return Scores(heads, [group_scores(h, s.n_kv_head) for s, h in zip(shapes, heads)],
                  [channel_scores(f) for f in stats.mlp])


def _structured(per_layer: list[dict[str, torch.Tensor]], shapes: list[LayerShape], root: bool) -> Scores:
    """Heads, groups and channels from per-row sums (q, k, v rows; o, down columns; gate, up rows)."""
    heads, groups, channels = [], [], []
    for s, t in zip(shapes, per_layer):
        h = (t["q"] + t["o"]).view(s.n_head, -1).sum(dim=1)
        g = (t["k"] + t["v"]).view(s.n_kv_head, -1).sum(dim=1) + group_scores(h, s.n_kv_head)
        c = t["gate"] + t["up"] + t["down"]
        heads.append(h.sqrt() if root else h)
        groups.append(g.sqrt() if root else g)
        channels.append(c.sqrt() if root else c)
    return Scores(heads, groups, channels)


def magnitude(model, windows: torch.Tensor, shapes: list[LayerShape], batch_size: int, seed: int,
              group=None) -> Scores:
    """L2 norm of each structure's weights (no data)."""
    return _structured(weight_products(model, lambda w: w.double().square()), shapes, root=True)


def taylor(model, windows: torch.Tensor, shapes: list[LayerShape], batch_size: int, seed: int,
           group=None) -> Scores:
    """First-order Taylor: |gradient x weight| summed over each structure's weights."""
    return _structured(weight_products(model, None, windows, batch_size, group), shapes, root=False)


def random(model, windows: torch.Tensor, shapes: list[LayerShape], batch_size: int, seed: int,
           group=None) -> Scores:
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    return Scores([draw(s.n_head) for s in shapes], [draw(s.n_kv_head) for s in shapes],
                  [draw(s.ffn_dim) for s in shapes])


METRICS = {"acts": acts, "magnitude": magnitude, "taylor": taylor, "random": random}
