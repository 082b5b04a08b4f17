"""Facts shared by GGUF export and import: which llama.cpp architecture a checkpoint becomes, how
its rope layout differs from transformers', and which metadata keys carry the shapes.

llama.cpp's `llama` and `deci` graphs rotate adjacent pairs (NORM rope); transformers' Llama,
Mistral and Qwen2 rotate halves (rotate_half). Q and K rows are therefore permuted on export with
each layer's own head counts, and permuted back on import. llama.cpp's `qwen2` graph uses NEOX
rope (halves), so a uniform Qwen2 keeps its rows as they are.
"""
from __future__ import annotations

import mmap

import numpy as np

from transact_edge.shapes import LayerShape

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


def read_kv(path, prefix: str = "") -> list[tuple[str, object, int, int | None]]:
    """(key, value, value type, array element type) of the metadata keys starting with `prefix`."""
    return [kv for kv in read_header(path)[0] if kv[0].startswith(prefix)]


class _Cursor:
    """Sequential reads of GGUF's little-endian header from a buffer."""

    def __init__(self, buf: memoryview, pos: int):
        self.buf, self.pos = buf, pos

    def number(self, fmt: str):
        v = np.frombuffer(self.buf, fmt, 1, self.pos)[0]
        self.pos += np.dtype(fmt).itemsize
        return v.item()

    def string(self) -> str:
        n = self.number("<u8")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int):
        import gguf

        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        v = self.number(_NUMBERS[vtype])
        return bool(v) if vtype == gguf.GGUFValueType.BOOL else v

    def array(self, sub: int) -> list:
        import gguf

        n = self.number("<u8")
        if sub == gguf.GGUFValueType.STRING:
            return [self.string() for _ in range(n)]
        dt = np.dtype(_NUMBERS[sub])
        out = np.frombuffer(self.buf, dt, n, self.pos).tolist()
        self.pos += n * dt.itemsize
        return out


# GGUFValueType -> numpy format (UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, UINT64, INT64, FLOAT64)
_NUMBERS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}


def read_header(path) -> tuple[list[tuple[str, object, int, int | None]], list[tuple[str, tuple[int, ...], int]]]:
    """All metadata (key, value, value type, array element type) and tensor infos (name, shape, type).

    gguf.GGUFReader builds a numpy view per array element: ~6 s for a 49K-token vocabulary. This
    reads the header sequentially instead (numbers via numpy, strings by offset), in ~0.1 s.
    """
    import gguf

    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # only the header's pages are read
    if mapped[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    c = _Cursor(memoryview(mapped), 8)
    n_tensors, n_kv = c.number("<u8"), c.number("<u8")
    out = []
    for _ in range(n_kv):
        key, vtype = c.string(), gguf.GGUFValueType(c.number("<u4"))
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(c.number("<u4"))
            out.append((key, c.array(sub), vtype, sub))
        else:
            out.append((key, c.value(vtype), vtype, None))
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        shape = tuple(c.number("<u8") for _ in range(c.number("<u4")))
        tensors.append((name, shape, c.number("<u4")))
        c.number("<u8")  # data offset
    return out, tensors


def per_layer(meta: dict, arch: str, key: str, n_layer: int, default=None) -> list:
    """A shape key as one value per layer: GGUF stores an array when layers differ (deci), else one number."""
    v = meta.get(f"{arch}.{key}", default)
    return list(v) if isinstance(v, list) else [v] * n_layer


def layer_shapes(meta: dict) -> tuple[list[LayerShape], int, int]:
    """Every layer's (n_head, n_kv_head, ffn_dim), and the K and V head sizes, from GGUF metadata."""
    arch = meta["general.architecture"]
    n_layer = meta[f"{arch}.block_count"]
    n_head = per_layer(meta, arch, "attention.head_count", n_layer)
    n_kv = per_layer(meta, arch, "attention.head_count_kv", n_layer, meta[f"{arch}.attention.head_count"])
    ffn = per_layer(meta, arch, "feed_forward_length", n_layer)
    hd = meta[f"{arch}.embedding_length"] // max(n_head)
    k_len = meta.get(f"{arch}.attention.key_length", hd)
    return ([LayerShape(*row) for row in zip(n_head, n_kv, ffn)], k_len, meta.get(f"{arch}.attention.value_length", k_len))
