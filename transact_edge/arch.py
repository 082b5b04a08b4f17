"""Per-architecture facts, as data.

Every supported family is a Llama-shaped decoder in transformers: `model.layers[i].self_attn`
holds q/k/v/o projections, `model.layers[i].mlp` gate/up/down. Families differ only in the
transformers classes, in which projections carry a bias and in the llama.cpp graph they become.
A new family is one row of FAMILIES (a new llama.cpp graph one row of GRAPHS).
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
ATTENTION, MLP = "self_attn", "mlp"      # the modules of a decoder layer that hold them
(MHA_INPUT,), (MLP_INPUT,) = HEAD_COLS, MLP_COLS  # whose inputs TransAct's statistics are taken on
ROTARY = {"q_proj": "n_head", "k_proj": "n_kv_head"}  # rows the rotary embedding turns -> LayerShape's head count


def module_of(projection: str) -> str:
    """The module of a decoder layer holding a projection (`self_attn` for q/k/v/o, `mlp` for the rest)."""
    return ATTENTION if projection in (*HEAD_ROWS, *KV_ROWS, *HEAD_COLS) else MLP


def projection(layer, name: str):
    """A decoder layer's projection by name: `o_proj` is layer.self_attn.o_proj."""
    return getattr(getattr(layer, module_of(name)), name)


@dataclass(frozen=True)
class Family:
    model_type: str      # config.model_type in transformers
    config_class: str    # class names in transformers' top-level namespace
    model_class: str
    gguf_arch: str       # general.architecture in GGUF (a row of GRAPHS)
    bias_switch: str | None = None  # the config field that turns attention biases on, set from a file's tensors


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaConfig", "LlamaForCausalLM", "llama", bias_switch="attention_bias"),
    "mistral": Family("mistral", "MistralConfig", "MistralForCausalLM", "llama"),
    "qwen2": Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "qwen2"),  # q/k/v biases always
}

PER_LAYER_PREFIX = "transact_"  # model_type of the per-layer-width variant of a family


@dataclass(frozen=True)
class Graph:
    """A llama.cpp graph (GGUF general.architecture) our exporter writes and our importer reads."""
    norm_rope: bool      # rotates adjacent pairs: Q/K rows are permuted from transformers' rotate_half
    rope_freqs: bool     # divides rotary frequencies by the rope_freqs tensor (llama3 scaling)
    narrow: bool         # accepts n_head * head_dim != hidden size


GRAPHS: dict[str, Graph] = {
    "llama": Graph(norm_rope=True, rope_freqs=True, narrow=True),
    # NEOX rope (halves, as transformers); shapes Q as hidden x hidden: pruned Qwen2 goes to `deci` (which keeps biases)
    "qwen2": Graph(norm_rope=False, rope_freqs=False, narrow=False),
    "deci": Graph(norm_rope=True, rope_freqs=True, narrow=True),
}
PER_LAYER_ARCH = "deci"  # the graph that honours per-layer head counts and FFN widths
PER_LAYER_FAMILY = "llama"  # whose classes a deci file that names no family (transact.family) loads into


def family_of(model_type: str) -> Family:
    """The family of a config.model_type, per-layer variants included."""
    from transact_edge.errors import UserError

    base = model_type.removeprefix(PER_LAYER_PREFIX)
    if base not in FAMILIES:
        raise UserError(f"unsupported architecture {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[base]
