"""Per-layer-width variants of the supported transformers families.

A TransAct model with the same widths in every layer is a stock Llama/Mistral/Qwen2 and needs
nothing from here. When widths differ per layer (`--per-layer`), the config carries per-layer
lists (shapes.PER_LAYER_KEYS) and the model class below builds each layer's attention and MLP
with that layer's sizes; the forward pass is the family's own, unchanged. Importing
`transact_edge` registers these classes with the transformers Auto classes.
"""
from __future__ import annotations

import copy

import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from .arch import FAMILIES, PER_LAYER_PREFIX
from .shapes import GLOBAL_KEYS, PER_LAYER_KEYS, layer_shapes


def _layer_config(config, il: int):
    """A shallow copy of `config` with layer il's widths as the global sizes."""
    shape = layer_shapes(config)[il]
    cfg = copy.copy(config)
    for field, key in GLOBAL_KEYS.items():
        setattr(cfg, key, getattr(shape, field))
    for key in PER_LAYER_KEYS.values():
        setattr(cfg, key, None)
    return cfg


def _per_layer_init(self, config) -> None:
    self._base_class.__init__(self, config)
    for il, layer in enumerate(self.model.layers):
        cfg = _layer_config(config, il)
        layer.self_attn = type(layer.self_attn)(cfg, layer_idx=il)
        layer.self_attn.config = config  # attention backend choice follows the model's config
        layer.mlp = type(layer.mlp)(cfg)
    self.post_init()


def _validate_architecture(self) -> None:
    """Pruned widths need not divide hidden_size; what must hold is GQA's grouping in every layer."""
    for il, s in enumerate(layer_shapes(self)):
        if s.n_kv_head <= 0 or s.n_head % s.n_kv_head:
            raise ValueError(f"layer {il}: n_head {s.n_head} is not a multiple of n_kv_head {s.n_kv_head}")


def _make_classes(family) -> tuple[type, type]:
    base_cfg = getattr(transformers, family.config_class)
    base_model = getattr(transformers, family.model_class)
    name = "TransAct" + family.model_class.removesuffix("ForCausalLM")
    cfg_cls = type(f"{name}Config", (base_cfg,), {
        "model_type": PER_LAYER_PREFIX + family.model_type,
        "validate_architecture": _validate_architecture,
        "__doc__": f"{family.config_class} with per-layer head counts and MLP widths.",
    })
    model_cls = type(f"{name}ForCausalLM", (base_model,), {
        "config_class": cfg_cls,
        "_base_class": base_model,
        "__init__": _per_layer_init,
        "__doc__": f"{family.model_class} whose layers have their own widths.",
    })
    AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    return cfg_cls, model_cls


PER_LAYER_CLASSES: dict[str, tuple[type, type]] = {name: _make_classes(f) for name, f in FAMILIES.items()}
