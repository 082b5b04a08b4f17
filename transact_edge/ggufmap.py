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


def read_header(path) -> tuple[list[tuple[str, object, int, int | None]], list[tuple[str, tuple[int, ...], int]]]:
    """All metadata (key, value, value type, array element type) and tensor infos (name, shape, type).

    gguf.GGUFReader builds a numpy view per array element: ~6 s for a 49K-token vocabulary. This
    reads the header sequentially instead (numbers via numpy, strings by offset), in ~0.1 s.
    """
    import gguf

    sizes = {gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
             gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
             gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.BOOL: "<u1", gguf.GGUFValueType.UINT64: "<u8",
             gguf.GGUFValueType.INT64: "<i8", gguf.GGUFValueType.FLOAT64: "<f8"}
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # only the header's pages are read
    if mapped[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    n_tensors = int(np.frombuffer(mapped, "<u8", 1, 8)[0])
    n_kv = int(np.frombuffer(mapped, "<u8", 1, 16)[0])
    buf = memoryview(mapped)
    pos = 24

    def u(fmt: str) -> int:
        nonlocal pos
        v = np.frombuffer(buf, fmt, 1, pos)[0]
        pos += np.dtype(fmt).itemsize
        return int(v)

    def string() -> str:
        nonlocal pos
        n = u("<u8")
        s = bytes(buf[pos:pos + n]).decode("utf-8")
        pos += n
        return s

    def value(vtype):
        nonlocal pos
        if vtype == gguf.GGUFValueType.STRING:
            return string()
        dt = np.dtype(sizes[vtype])
        v = np.frombuffer(buf, dt, 1, pos)[0]
        pos += dt.itemsize
        return bool(v) if vtype == gguf.GGUFValueType.BOOL else v.item()

    out = []
    for _ in range(n_kv):
        key = string()
        vtype = gguf.GGUFValueType(u("<u4"))
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(u("<u4"))
            n = u("<u8")
            if sub == gguf.GGUFValueType.STRING:
                val = [string() for _ in range(n)]
            else:
                dt = np.dtype(sizes[sub])
                val = np.frombuffer(buf, dt, n, pos).tolist()
                pos += n * dt.itemsize
            out.append((key, val, vtype, sub))
        else:
            out.append((key, value(vtype), vtype, None))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        shape = tuple(u("<u8") for _ in range(u("<u4")))
        ttype = u("<u4")
        u("<u8")  # data offset
        tensors.append((name, shape, ttype))
    return out, tensors
