"""Depth pruning, the baseline that TransAct's width pruning must beat: `prune --drop-layers N`.

ShortGPT (Men et al., arXiv 2403.03853): a layer's Block Influence is 1 - the mean cosine
similarity between the hidden state entering it and the one leaving it, over the calibration
tokens; the N layers that change the hidden state least are removed. The result is a stock model
with fewer layers, recovered by the same training (KD or LM) as the width-pruned models, so that
width and depth are compared fairly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from transact_edge.errors import UserError
from transact_edge.shapes import PER_LAYER_KEYS, layer_shapes
from transact_edge.modeling import assemble, config_for


@torch.no_grad()
def block_influence(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n_layer,) 1 - mean over calibration tokens of cos(input, output) of every decoder layer."""
    device = next(model.parameters()).device
    sums = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64)

    def hook(il: int):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            sums[il] += F.cosine_similarity(h_in.float(), h_out.float(), dim=-1).double().sum().cpu()
        return record

    handles = [layer.register_forward_hook(hook(il), with_kwargs=True) for il, layer in enumerate(model.model.layers)]
    try:
        for ids in windows.split(batch_size):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return 1 - sums / windows.numel()


def check(n_drop: int, n_layer: int) -> None:
    if not 0 <= n_drop < n_layer - 1:
        raise UserError(f"--drop-layers must be between 0 and {n_layer - 2} for a model of {n_layer} layers, "
                        f"got {n_drop}")


def choose(influence: torch.Tensor, n_drop: int) -> list[int]:
    """The n_drop layers of least influence, ascending."""
    return sorted(torch.topk(influence, n_drop, largest=False).indices.tolist())


def drop(model, layers: list[int]):
    """A new model without the decoder `layers` (numbered in `model`); the rest renumbered in order."""
    n_layer = model.config.num_hidden_layers
    keep = [il for il in range(n_layer) if il not in set(layers)]
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    for key in (*PER_LAYER_KEYS.values(), "layer_types"):
        if getattr(cfg, key, None):
            setattr(cfg, key, [getattr(cfg, key)[il] for il in keep])
    new_index = {old: new for new, old in enumerate(keep)}
    sd = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            il, rest = name[len("model.layers."):].split(".", 1)
            if int(il) not in new_index:
                continue
            name = f"model.layers.{new_index[int(il)]}.{rest}"
        sd[name] = t
    buffers = {n: b for n, b in model.named_buffers() if not n.startswith("model.layers.")}
    shapes = [layer_shapes(model.config)[il] for il in keep]
    return assemble(config_for(cfg, shapes), sd, buffers, model.training)
