"""Per-layer widths of a Llama-shaped model and what follows from them (parameters, KV bytes).

Names used everywhere: n_layer, n_head, n_kv_head, head_dim, ffn_dim.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Per-layer lists in a config of a per-layer-width model (see modeling.py).
PER_LAYER_KEYS = {
    "n_head": "num_attention_heads_per_layer",
    "n_kv_head": "num_key_value_heads_per_layer",
    "ffn_dim": "intermediate_size_per_layer",
}
GLOBAL_KEYS = {"n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "ffn_dim": "intermediate_size"}


@dataclass(frozen=True)
class LayerShape:
    n_head: int
    n_kv_head: int
    ffn_dim: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shapes(config: Any) -> list[LayerShape]:
    """Widths of every layer: the per-layer lists when the config has them, else the global sizes."""
    n_layer = config.num_hidden_layers
    cols = {}
    for field, key in PER_LAYER_KEYS.items():
        per_layer = getattr(config, key, None)
        cols[field] = list(per_layer) if per_layer else [getattr(config, GLOBAL_KEYS[field])] * n_layer
    return [LayerShape(*row) for row in zip(cols["n_head"], cols["n_kv_head"], cols["ffn_dim"])]


def is_uniform(shapes: list[LayerShape]) -> bool:
    return len(set(shapes)) == 1


def kv_bytes_per_token(shapes: list[LayerShape], hd: int, bytes_per_elem: int = 2) -> int:
    """K and V of every layer for one token; 2 bytes per element is llama.cpp's default f16 cache."""
    return sum(2 * s.n_kv_head * hd * bytes_per_elem for s in shapes)


def count_params(model: Any) -> int:
    """Parameters, a tied output head counted once."""
    return sum(p.numel() for p in model.parameters())


def config_params(config: Any) -> int:
    """Parameters a config describes (biases and norms counted roughly): what a file of it will hold."""
    hd, d = head_dim(config), config.hidden_size
    vocab = config.vocab_size * d * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return vocab + sum((2 * s.n_head + 2 * s.n_kv_head) * hd * d + 3 * s.ffn_dim * d + 2 * d
                       for s in layer_shapes(config))


def summary(shapes: list[LayerShape], hd: int, params: int) -> dict:
    """A model's shapes as transact.json records them (dense and pruned, in memory and streamed)."""
    return {"layers": [s.as_dict() for s in shapes], "uniform": is_uniform(shapes), "head_dim": hd, "params": params,
            "kv_bytes_per_token_f16": kv_bytes_per_token(shapes, hd)}


def widths_line(shapes: list[LayerShape]) -> str:
    if is_uniform(shapes):
        s = shapes[0]
        return f"every layer: {s.n_head} heads / {s.n_kv_head} KV heads, MLP {s.ffn_dim}"
    return "per layer: " + " ".join(f"{s.n_kv_head}/{s.n_head}/{s.ffn_dim}" for s in shapes) + " (kv/heads/mlp)"
