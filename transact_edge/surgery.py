"""Cut heads and channels: a state-dict transform plus a fresh model built from the new config.

Symmetric by construction: q rows / o columns by query head, k and v rows by KV head, gate and up
rows / down columns by MLP channel. Plans are validated before any weight is touched, and the
new model loads the cut weights with strict=True, so every key's shape is checked.
"""
from __future__ import annotations

import logging

import torch

from transact_edge.arch import HEAD_COLS, HEAD_ROWS, KV_ROWS, MLP_COLS, MLP_ROWS, module_of
from transact_edge import memory
from transact_edge.errors import UserError
from transact_edge.modeling import assemble, config_for
from transact_edge.plan import LayerPlan
from transact_edge.shapes import LayerShape, head_dim, layer_shapes

log = logging.getLogger(__name__)


def validate(plans: list[LayerPlan], shapes: list[LayerShape]) -> None:
    """Indices unique, ascending, in range; query heads evenly inside kept KV groups."""
    if len(plans) != len(shapes):
        raise UserError(f"plan has {len(plans)} layers, model has {len(shapes)}")
    for il, (p, s) in enumerate(zip(plans, shapes)):
        for name, idx, n in (("kv_heads", p.kv_heads, s.n_kv_head), ("heads", p.heads, s.n_head),
                             ("channels", p.channels, s.ffn_dim)):
            if not idx or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
                raise UserError(f"layer {il}: {name} must be ascending unique indices in [0, {n}), got {idx[:8]}...")
        group = s.n_head // s.n_kv_head
        per_group = {g: sum(1 for h in p.heads if h // group == g) for g in p.kv_heads}
        if any(h // group not in per_group for h in p.heads) or len(set(per_group.values())) != 1:
            raise UserError(f"layer {il}: query heads must sit evenly inside the kept KV groups")


def unit_rows(idx: list[int], width: int) -> torch.Tensor:
    """Row indices of whole units (heads) of `width` rows each."""
    base = torch.tensor(idx, dtype=torch.long)[:, None] * width
    return (base + torch.arange(width)).reshape(-1)


def cut_layer(sd: dict, prefix: str, p: LayerPlan, hd: int) -> None:
    heads, kv, ch = unit_rows(p.heads, hd), unit_rows(p.kv_heads, hd), torch.tensor(p.channels)
    # (projections, dimension cut, kept indices); biases follow their rows
    cuts = [(HEAD_ROWS, 0, heads), (KV_ROWS, 0, kv), (HEAD_COLS, 1, heads), (MLP_ROWS, 0, ch), (MLP_COLS, 1, ch)]
    for names, dim, idx in cuts:
        for n in names:
            for kind in ("weight", "bias") if dim == 0 else ("weight",):
                key = f"{prefix}.{module_of(n)}.{n}.{kind}"
                if key in sd:
                    sd[key] = sd[key].index_select(dim, idx.to(sd[key].device))


def _kept(t: torch.Tensor, sd: dict) -> bool:
    """Whether the new state dict still uses this tensor as it is (a norm, or a projection cut to itself)."""
    return any(v is t or (v.data_ptr() == t.data_ptr() and v.device == t.device) for v in sd.values())


def cut(model, plans: list[LayerPlan], consume: bool = False):
    """A new model holding only the planned heads and channels.

    `model` is left as it was, unless `consume`: then each layer's old weights are released as soon
    as that layer is cut, so memory peaks at about one model plus one layer, not two models.
    """
    shapes = layer_shapes(model.config)
    validate(plans, shapes)
    hd = head_dim(model.config)
    sd = dict(model.state_dict())
    buffers = dict(model.named_buffers())
    for il, p in enumerate(plans):
        cut_layer(sd, f"model.layers.{il}", p, hd)
        if consume:
            layer = model.model.layers[il]
            memory.drop_file_pages([t for t in layer.state_dict().values() if not _kept(t, sd)])
            layer.to("meta")
    return assemble(config_for(model.config, [p.shape for p in plans]), sd, buffers, model.training)
