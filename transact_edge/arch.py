"""Per-architecture facts, as data.

Every supported family is a Llama-shaped decoder in transformers: `model.layers[i].self_attn`
holds q/k/v/o projections, `model.layers[i].mlp` gate/up/down. Families differ only in the
transformers classes and in which projections carry a bias. A new family is one row here.
"""
from __future__ import annotations

from dataclasses import dataclass

# Projections whose *output* rows belong to attention heads / MLP channels, and their partners
# whose *input* columns do. Same names in every supported family.
HEAD_ROWS = ("q_proj",)                  # rows grouped by query head
KV_ROWS = ("k_proj", "v_proj")           # rows grouped by KV head
HEAD_COLS = ("o_proj",)                  # columns grouped by query head (the MHA transitional activation)
MLP_ROWS = ("gate_proj", "up_proj")      # rows = MLP channels
MLP_COLS = ("down_proj",)                # columns = MLP channels (the MLP transitional activation)


@dataclass(frozen=True)
class Family:
    model_type: str      # config.model_type in transformers
    config_class: str    # class names in transformers' top-level namespace
    model_class: str
    gguf_arch: str       # general.architecture in GGUF
    gguf_narrow: bool    # does that llama.cpp graph accept n_head * head_dim != hidden size?


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaConfig", "LlamaForCausalLM", "llama", gguf_narrow=True),
    "mistral": Family("mistral", "MistralConfig", "MistralForCausalLM", "llama", gguf_narrow=True),
    # llama.cpp's qwen2 graph shapes Q as hidden x hidden: pruned Qwen2 goes to `deci` (which keeps biases)
    "qwen2": Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "qwen2", gguf_narrow=False),
}

PER_LAYER_PREFIX = "transact_"  # model_type of the per-layer-width variant of a family


def family_of(model_type: str) -> Family:
    """The family of a config.model_type, per-layer variants included."""
    from transact_edge.errors import UserError

    base = model_type.removeprefix(PER_LAYER_PREFIX)
    if base not in FAMILIES:
        raise UserError(f"unsupported architecture {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[base]
