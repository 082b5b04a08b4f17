"""Per-layer-width variants of the supported transformers families.

A TransAct model with the same widths in every layer is a stock Llama/Mistral/Qwen2 and needs
nothing from here. When widths differ per layer (`--per-layer`), the config carries per-layer
lists (shapes.PER_LAYER_KEYS) and the model class below builds each layer's attention and MLP
with that layer's sizes; the forward pass is the family's own, unchanged. Importing
`transact_edge.modeling` registers these classes with the transformers Auto classes; the model
skeleton, the config for given widths and `assemble` (tensors into a model) live here too.
"""
from __future__ import annotations

import copy
import logging

import torch
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM

from transact_edge.arch import FAMILIES, PER_LAYER_PREFIX, family_of
from transact_edge.shapes import GLOBAL_KEYS, PER_LAYER_KEYS, LayerShape, head_dim, is_uniform, layer_shapes

log = logging.getLogger(__name__)


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


def _validate(self) -> None:
    """The stock config's validators with ours in place of its architecture check. (The stock
    `validate` runs the validators of the class it was made for, whatever the subclass defines, and
    save_pretrained calls it: a shot's checkpoint with 5 heads on a hidden size of 96 failed there.)"""
    for validator in type(self).__class_validators__:
        try:
            validator(self)
        except (ValueError, TypeError) as e:
            raise StrictDataclassClassValidationError(validator=validator.__name__, cause=e) from e


def _make_classes(family) -> tuple[type, type]:
    base_cfg = getattr(transformers, family.config_class)
    base_model = getattr(transformers, family.model_class)
    name = "TransAct" + family.model_class.removesuffix("ForCausalLM")
    stock = [v for v in getattr(base_cfg, "__class_validators__", []) if v.__name__ != "validate_architecture"]
    cfg_cls = type(f"{name}Config", (base_cfg,), {
        "model_type": PER_LAYER_PREFIX + family.model_type,
        "validate_architecture": _validate_architecture,
        "__class_validators__": [*stock, _validate_architecture],
        "validate": _validate,
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


def config_for(config, shapes: list[LayerShape]):
    """A stock family config when widths are uniform, else the per-layer variant."""
    family = family_of(config.model_type)
    d = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", *PER_LAYER_KEYS.values()):
        d.pop(key, None)
    d["head_dim"] = head_dim(config)  # explicit: no longer hidden_size / num_attention_heads
    for field, key in GLOBAL_KEYS.items():
        d[key] = max(getattr(s, field) for s in shapes)
    cfg = None
    if is_uniform(shapes):
        try:
            cfg = getattr(transformers, family.config_class)(**d)
        except StrictDataclassClassValidationError:
            # e.g. transformers' LlamaConfig insists that n_head divides hidden_size, which pruned
            # widths need not do: such a model is saved as the per-layer variant (same weights).
            log.warning("the stock %s refuses these widths; saving as the per-layer variant", family.config_class)
    if cfg is None:
        for field, key in PER_LAYER_KEYS.items():
            d[key] = [getattr(s, field) for s in shapes]
        cfg = PER_LAYER_CLASSES[family.model_type][0](**d)
    cfg._attn_implementation = config._attn_implementation
    return cfg


def model_class(config):
    family = family_of(config.model_type)
    if config.model_type == family.model_type:
        return getattr(transformers, family.model_class)
    return PER_LAYER_CLASSES[family.model_type][1]


def skeleton(config):
    """A model of `config` on the meta device: its structure without memory, for weights to be assigned."""
    with torch.device("meta"):
        return model_class(config)(config)


def assemble(cfg, sd: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], training: bool = False):
    """A model of `cfg`'s class holding the tensors of `sd` (no copy) and the non-persistent buffers."""
    new = skeleton(cfg)
    new.load_state_dict(sd, strict=True, assign=True)
    for name, buf in buffers.items():  # rotary tables etc.: not in the state dict, unchanged by pruning
        owner, _, leaf = name.rpartition(".")
        new.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    new.tie_weights()
    new.to(sd["model.embed_tokens.weight"].device)
    new.train(training)
    return new
