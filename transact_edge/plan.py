"""Which widths each shot aims for, and which heads/channels survive: data, replayable.

Widths. The final target is uniform (the paper's architecture): n_kv_head KV groups with
n_head / n_kv_head query heads each, and ffn_dim MLP channels, rounded to a multiple of `round_to`.
Each shot steps towards it by the reference rule next = cur - (cur - target) // remaining, applied to
KV groups, query heads per group and MLP channels (MLP rounded up to `round_to`).

Per-layer widths (`--per-layer`): the same total budget as the uniform widths of the shot, shared
out across layers by score (any metric of salience.py). Units are KV groups (with their query heads)
and blocks of `round_to` MLP channels. A unit's gain is its share of its layer's energy (sum of
squared channel scores s_j^2, or of group scores for attention); the units with the largest gains win, so a layer whose activations are spread evenly
keeps more than one whose energy sits in a few channels. Each layer keeps between half and twice the
uniform width (never more than it has, never less than one unit).

`--round-to auto` (opt-in) serves llama.cpp's K- and i-quants, whose rows must be multiples of 256
(else llama-quantize falls back to a wider type per tensor): widths derived from ratios are rounded
up, never cut further than asked, so that each cut tensor's row (ffn_down's = the MLP width,
attn_output's = heads x head_dim) is a multiple of 256 where the model has room for it. Explicit
--heads/--kv-heads/--mlp are kept as given.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from transact_edge import record
from transact_edge.errors import UserError
from transact_edge.salience import Scores
from transact_edge.shapes import LayerShape


@dataclass(frozen=True)
class WidthRequest:
    """What the user asked for; at most one of each pair is set."""
    heads: int | None = None
    kv_heads: int | None = None
    mlp: int | None = None
    attn_ratio: float | None = None
    mlp_ratio: float | None = None
    round_to: int | str = 32         # MLP unit, or AUTO: rows of the cut tensors in multiples of QUANT_ROW


AUTO = "auto"
QUANT_ROW = 256  # K-/i-quant super-block (llama-quant.cpp falls back per tensor for other row lengths)
@dataclass
class LayerPlan:
    """Kept indices of one layer, in the layer's current numbering, ascending."""
    kv_heads: list[int]
    heads: list[int]
    channels: list[int]

    @property
    def shape(self) -> LayerShape:
        return LayerShape(len(self.heads), len(self.kv_heads), len(self.channels))


def _check_ratio(name: str, r: float | None) -> None:
    if r is not None and not 0.0 < r <= 1.0:
        raise UserError(f"{name} must be in (0, 1], got {r}")


def _unit(round_to: int | str) -> int:
    """The MLP rounding unit of a --round-to value."""
    return QUANT_ROW if round_to == AUTO else int(round_to)


def _round_up(x: int, unit: int, cap: int) -> int:
    return min(cap, max(unit, math.ceil(x / unit) * unit)) if cap >= unit else cap


def check_request(req: WidthRequest) -> None:
    """What can be checked without the model."""
    _check_ratio("--attn-ratio", req.attn_ratio)
    _check_ratio("--mlp-ratio", req.mlp_ratio)
    if req.round_to != AUTO and (not isinstance(req.round_to, int) or req.round_to <= 0):
        raise UserError(f"--round-to must be a positive integer or 'auto', got {req.round_to}")
    if req.heads is not None and req.attn_ratio is not None:
        raise UserError("give --heads/--kv-heads or --attn-ratio, not both")
    if req.mlp is not None and req.mlp_ratio is not None:
        raise UserError("give --mlp or --mlp-ratio, not both")


def _auto_kv(dense: LayerShape, ratio: float, hd: int) -> int:
    """Fewest KV groups >= the ratio asks whose attn_output row is a multiple of QUANT_ROW (else the ratio's)."""
    group = dense.n_head // dense.n_kv_head
    least = max(1, math.ceil(ratio * dense.n_kv_head - 1e-9))
    return next((kv for kv in range(least, dense.n_kv_head + 1) if kv * group * hd % QUANT_ROW == 0), least)


def _auto_ffn(dense: int, ratio: float) -> int:
    """The MLP width rounded up to a multiple of QUANT_ROW, or of 32 where that would exceed the model's."""
    least = math.ceil(ratio * dense - 1e-9)
    up = math.ceil(least / QUANT_ROW) * QUANT_ROW
    return up if up <= dense else _round_up(least, 32, dense)


def target(dense: LayerShape, req: WidthRequest, hd: int = 0) -> LayerShape:
    """The uniform final widths for a model whose (largest) layer is `dense` (head_dim `hd`: --round-to auto)."""
    check_request(req)
    group = dense.n_head // dense.n_kv_head  # query heads per KV group
    kv = req.kv_heads
    if req.attn_ratio is not None and req.round_to == AUTO and req.heads is None:
        kv = _auto_kv(dense, req.attn_ratio, hd)
    elif req.attn_ratio is not None:  # the ratio removes whole KV groups: the KV cache shrinks with it
        kv = max(1, round(req.attn_ratio * dense.n_kv_head))
    if kv is None:
        kv = dense.n_kv_head
    heads = req.heads if req.heads is not None else kv * group
    if not 1 <= kv <= dense.n_kv_head:
        raise UserError(f"--kv-heads must be between 1 and {dense.n_kv_head}, got {kv}")
    if not 1 <= heads <= kv * group or heads % kv:
        raise UserError(f"--heads must be a multiple of the {kv} KV heads kept, at most {kv * group} "
                        f"({group} query heads per KV group), got {heads}")
    ffn = dense.ffn_dim
    if req.mlp is not None:
        if not 1 <= req.mlp <= dense.ffn_dim:
            raise UserError(f"--mlp must be between 1 and {dense.ffn_dim}, got {req.mlp}")
        ffn = req.mlp
    elif req.mlp_ratio is not None and req.round_to == AUTO:
        ffn = _auto_ffn(dense.ffn_dim, req.mlp_ratio)
    elif req.mlp_ratio is not None:
        ffn = _round_up(round(req.mlp_ratio * dense.ffn_dim), req.round_to, dense.ffn_dim)
    return LayerShape(heads, kv, ffn)


def row_lengths(shapes: list[LayerShape], hd: int) -> list[dict[str, int]]:
    """Per layer, the row length of the tensors a cut narrows: what llama-quantize's blocks must divide."""
    return [{"attn_output": s.n_head * hd, "ffn_down": s.ffn_dim} for s in shapes]


def unquantizable_rows(dense: LayerShape, shapes: list[LayerShape], hd: int) -> str | None:
    """One line naming the cut rows that are not multiples of QUANT_ROW, or None."""
    odd = sorted({f"{name} {n}" for s in shapes for name, n in row_lengths([s], hd)[0].items()
                  if n % QUANT_ROW and n != (dense.n_head * hd if name == "attn_output" else dense.ffn_dim)})
    if not odd:
        return None
    return (f"--round-to auto: cut rows of {', '.join(odd)} are not multiples of {QUANT_ROW} (the model has no "
            f"room to round them up, or the widths were given explicitly); K-/i-quants fall back for them")


def step(cur: LayerShape, tgt: LayerShape, remaining: int, round_to: int | str) -> LayerShape:
    """One shot of the reference schedule from `cur` towards `tgt` with `remaining` shots left."""
    def go(c: int, t: int) -> int:
        return c - (c - t) // remaining
    kv = go(cur.n_kv_head, tgt.n_kv_head)
    group = go(cur.n_head // cur.n_kv_head, tgt.n_head // tgt.n_kv_head)
    ffn = go(cur.ffn_dim, tgt.ffn_dim)
    if remaining > 1:
        ffn = max(tgt.ffn_dim, _round_up(ffn, _unit(round_to), cur.ffn_dim))
    return LayerShape(kv * group, kv, ffn)


def _allocate(gains: list[torch.Tensor], lo: list[int], hi: list[int], total: int) -> list[int]:
    """Units per layer: each layer's `lo` first, then the globally largest remaining gains."""
    counts = list(lo)
    left = total - sum(lo)
    candidates = [(float(g), il) for il, layer in enumerate(gains) for g in layer[lo[il]:hi[il]]]
    candidates.sort(key=lambda c: -c[0])  # gains fall within a layer, so each layer takes a prefix
    for _, il in candidates[:max(0, left)]:
        counts[il] += 1
    return counts


def per_layer_widths(scores: Scores, shapes: list[LayerShape], uniform: LayerShape,
                     round_to: int | str) -> list[LayerShape]:
    """Per-layer widths with the total of `uniform` in every layer, shared out by score."""
    n_layer, round_to = len(shapes), _unit(round_to)
    group = uniform.n_head // uniform.n_kv_head
    att_gain, mlp_gain = [], []
    for g, c in zip(scores.groups, scores.channels):
        att_gain.append(torch.sort(g / g.sum(), descending=True).values)
        energy = c.double().square()
        e = torch.sort(energy / energy.sum(), descending=True).values
        pad = (-e.numel()) % round_to
        blocks = torch.nn.functional.pad(e, (0, pad)).view(-1, round_to).sum(dim=1)  # (n_blocks,)
        mlp_gain.append(blocks)
    kv = _allocate(
        att_gain,
        lo=[min(s.n_kv_head, max(1, uniform.n_kv_head // 2)) for s in shapes],
        hi=[min(s.n_kv_head, 2 * uniform.n_kv_head) for s in shapes],
        total=n_layer * uniform.n_kv_head,
    )
    unit_target = uniform.ffn_dim / round_to
    blocks = _allocate(
        mlp_gain,
        lo=[min(math.ceil(s.ffn_dim / round_to), max(1, math.floor(unit_target / 2))) for s in shapes],
        hi=[min(math.ceil(s.ffn_dim / round_to), math.ceil(2 * unit_target)) for s in shapes],
        total=round(n_layer * unit_target),
    )
    return [LayerShape(k * group, k, min(s.ffn_dim, b * round_to)) for k, b, s in zip(kv, blocks, shapes)]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def select(scores: Scores, shapes: list[LayerShape], new: list[LayerShape]) -> list[LayerPlan]:
    """Kept KV groups, query heads (evenly inside each kept group) and MLP channels per layer."""
    plans = []
    for s, n, heads, groups, channels in zip(shapes, new, scores.heads, scores.groups, scores.channels):
        kv = _top(groups, n.n_kv_head)
        cur_group, new_group = s.n_head // s.n_kv_head, n.n_head // n.n_kv_head
        kept_heads = []
        for g in kv:  # groups ascending, heads ascending inside: head h -> KV head h // new_group holds
            members = heads[g * cur_group:(g + 1) * cur_group]
            kept_heads += [g * cur_group + i for i in _top(members, new_group)]
        plans.append(LayerPlan(kv, kept_heads, _top(channels, n.ffn_dim)))
    return plans


@dataclass
class Plan:
    """What a prune keeps, in the source model's numbering, composed across shots: per layer the kept
    KV heads, query heads and MLP channels, and the kept decoder layers. With where it came from (the
    source's dense shapes, which the indices number) and how it was chosen, it replays: `prune --plan
    transact.json` cuts another checkpoint of the same shapes identically, without calibration."""
    kv_heads: list[list[int]]
    heads: list[list[int]]
    channels: list[list[int]]
    layers: list[int]                                   # kept decoder layers of the source
    source: dict = field(default_factory=dict)          # model, model_type, layers (dense LayerShape dicts)
    made: dict = field(default_factory=dict)            # metric, shots, seed, per_layer, calibration

    @classmethod
    def dense(cls, shapes: list[LayerShape], source: dict | None = None, made: dict | None = None) -> "Plan":
        return cls([list(range(s.n_kv_head)) for s in shapes], [list(range(s.n_head)) for s in shapes],
                   [list(range(s.ffn_dim)) for s in shapes], list(range(len(shapes))),
                   (source or {}) | {"layers": [s.as_dict() for s in shapes]}, made or {})

    def drop_layers(self, dropped: list[int]) -> None:
        """Forget the decoder layers `dropped` (numbered in the current model)."""
        keep = [il for il in range(len(self.heads)) if il not in set(dropped)]
        self.kv_heads, self.heads, self.channels = ([rows[il] for il in keep]
                                                    for rows in (self.kv_heads, self.heads, self.channels))
        self.layers = [self.layers[il] for il in keep]

    def apply(self, plans: list[LayerPlan]) -> None:
        """Compose one shot's cut (indices in the current numbering) into the source numbering."""
        for il, p in enumerate(plans):
            self.kv_heads[il] = [self.kv_heads[il][i] for i in p.kv_heads]
            self.heads[il] = [self.heads[il][i] for i in p.heads]
            self.channels[il] = [self.channels[il][i] for i in p.channels]

    def dropped(self) -> list[int]:
        """Source layers the plan removes."""
        return [il for il in range(len(self.source["layers"])) if il not in set(self.layers)]

    def layer_plans(self) -> list[LayerPlan]:
        """The cut of the source model, once its dropped layers are gone, as one shot."""
        return [LayerPlan(k, h, c) for k, h, c in zip(self.kv_heads, self.heads, self.channels)]

    def dense_shapes(self) -> list[LayerShape]:
        """The source's dense shapes, which the indices number."""
        return [LayerShape(**s) for s in self.source["layers"]]

    def check_source(self, shapes: list[LayerShape], where: str) -> None:
        """Refuse a model whose dense shapes are not the ones the indices number."""
        want = self.dense_shapes()
        if shapes != want:
            raise UserError(f"{where}: the plan was made for {len(want)} layers of {_shapes_line(want)}, "
                            f"this model has {len(shapes)} layers of {_shapes_line(shapes)}")

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "numbering": "indices in the source model", **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        if d.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise UserError(f"plan version {d['version']} is newer than this transact-edge reads ({PLAN_VERSION})")
        return cls(**{k: d[k] for k in ("kv_heads", "heads", "channels", "layers", "source", "made")})

    @classmethod
    def load(cls, path: Path) -> "Plan":
        """The plan of a transact.json file (any format record.py reads), or of the directory holding one."""
        file = path / record.FILE if path.is_dir() else path
        try:
            kept = record.read_file(file).plan
            if kept is None:
                raise KeyError("plan")
            return cls.from_json(kept)
        except FileNotFoundError:
            raise UserError(f"--plan {path}: no such file (give a transact.json or the directory of one)") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"--plan {file}: not a transact-edge plan ({type(e).__name__}: {e})") from None


PLAN_VERSION = 1


def _shapes_line(shapes: list[LayerShape]) -> str:
    distinct = sorted(set(shapes), key=lambda s: (s.n_head, s.ffn_dim))
    return ", ".join(f"{s.n_head} heads / {s.n_kv_head} KV heads / MLP {s.ffn_dim}" for s in distinct)
