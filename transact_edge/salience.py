"""Scores from calibration statistics: channels, heads and KV groups (pure tensor functions).

Channel salience s_j = sqrt(sum_t a_j(t)^2). A head's score is mean_j s_j + alpha * max_j s_j over
its head_dim channels, alpha = 10 / head_dim (the reference code's rule). GQA: a KV group's score
is the sum of the scores of the query heads that read it (query head h reads KV head
h // (n_head / n_kv_head)).
"""
from __future__ import annotations

import torch


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
