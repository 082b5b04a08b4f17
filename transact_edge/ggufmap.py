"""Facts shared by GGUF export and import: which llama.cpp architecture a checkpoint becomes, how
its rope layout differs from transformers', and which metadata keys carry the shapes.

llama.cpp's `llama` and `deci` graphs rotate adjacent pairs (NORM rope); transformers' Llama,
Mistral and Qwen2 rotate halves (rotate_half). Q and K rows are therefore permuted on export with
each layer's own head counts, and permuted back on import. llama.cpp's `qwen2` graph uses NEOX
rope (halves), so a uniform Qwen2 keeps its rows as they are.
"""
from __future__ import annotations

import numpy as np

NORM_ROPE = {"llama", "deci"}     # architectures whose Q/K rows are permuted
PER_LAYER_ARCH = "deci"           # the llama.cpp graph that honours per-layer head counts and FFN widths

# transformers config field <- GGUF key (under the architecture's prefix); per-layer ones may be arrays.
CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "head_dim": "attention.key_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
}


def to_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of Q or K (weight or bias) from rotate_half layout to adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of to_llama_cpp."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
