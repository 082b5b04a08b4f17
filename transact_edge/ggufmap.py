"""Facts shared by GGUF export and import: how a checkpoint's rope layout differs from transformers',
which metadata keys carry the shapes, TransAct's own keys, and a bounded reader of the header.

llama.cpp's `llama` and `deci` graphs rotate adjacent pairs (NORM rope); transformers' Llama,
Mistral and Qwen2 rotate halves (rotate_half). Q and K rows are therefore permuted on export with
each layer's own head counts, and permuted back on import (arch.GRAPHS says which graph does what).
"""
from __future__ import annotations

import math
import mmap
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from transact_edge.arch import GRAPHS, ROTARY
from transact_edge.errors import UserError
from transact_edge.shapes import LayerShape

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

# TransAct's own metadata, `transact.<name>`: name -> (value type, element type of an array). What the
# pruning did, for llama.cpp consumers; and what our importer needs back (the family's classes, llama3
# rope parameters). Written by add_ours, read by ours(name).
OURS = "transact."
_V = GGUFValueType
TRANSACT_KEYS: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    "family": (_V.STRING, None),              # the family whose classes a `deci` file loads into
    "source": (_V.STRING, None),              # the model pruned
    "shots": (_V.UINT32, None),
    "calibration_tokens": (_V.UINT32, None),
    "recovery_tokens": (_V.UINT64, None),
    "dense_params": (_V.UINT64, None),
    "n_head": (_V.ARRAY, _V.INT32),           # per layer
    "n_kv_head": (_V.ARRAY, _V.INT32),
    "ffn_dim": (_V.ARRAY, _V.INT32),
    "rope.llama3.factor": (_V.FLOAT32, None),
    "rope.llama3.low_freq_factor": (_V.FLOAT32, None),
    "rope.llama3.high_freq_factor": (_V.FLOAT32, None),
    "rope.llama3.original_context_length": (_V.UINT32, None),
}


def ours(name: str) -> str:
    """The GGUF key of one of our names (`family` -> `transact.family`); KeyError for a name not in the table."""
    if name not in TRANSACT_KEYS:
        raise KeyError(f"{name!r} is not one of our GGUF keys (ggufmap.TRANSACT_KEYS)")
    return OURS + name


def add_ours(writer, name: str, value) -> None:
    """One of our keys, of the type TRANSACT_KEYS gives it."""
    writer.add_key_value(ours(name), value, *TRANSACT_KEYS[name])


def rotary_rows(n_head: int, n_rows: int) -> np.ndarray:
    """llama.cpp's rotary row order: row i of a Q or K in adjacent-pair layout is row rotary_rows[i] of the
    rotate_half layout (pair (j, j + d/2) of each head of d rows becomes rows (2j, 2j + 1))."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def to_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of Q or K (weight or bias) from rotate_half layout to adjacent pairs."""
    return w[rotary_rows(n_head, w.shape[0])]


def from_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of to_llama_cpp."""
    return w[np.argsort(rotary_rows(n_head, w.shape[0]))]


def permute_qk(key: str, w: np.ndarray, shapes: list[LayerShape], back: bool = False) -> np.ndarray:
    """A checkpoint tensor as a NORM-rope graph stores it: the rows of a layer's Q or K (weight or bias,
    `model.layers.{i}.self_attn.{q,k}_proj.*`) in llama.cpp's rotary order with that layer's own head
    count (back: from that order), any other tensor as it is."""
    parts = key.split(".")
    if len(parts) < 6 or parts[:2] != ["model", "layers"] or parts[4] not in ROTARY:
        return w
    n_head = getattr(shapes[int(parts[2])], ROTARY[parts[4]])
    return from_llama_cpp(w, n_head) if back else to_llama_cpp(w, n_head)


def read_kv(path, prefix: str = "") -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """(key, value, value type, array element type) of the metadata keys starting with `prefix`."""
    return [kv for kv in read_header(path)[0] if kv[0].startswith(prefix)]


class _Cursor:
    """Sequential reads of GGUF's little-endian header from a buffer. Every count and length the file
    claims is compared with the bytes left before anything is read or allocated (ValueError if not)."""

    def __init__(self, buf: memoryview, pos: int):
        self.buf, self.pos = buf, pos

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        """The position of the next n bytes, which must lie in the file."""
        if n > self.left():
            raise ValueError(f"{what} at byte {self.pos} needs {n:,} bytes, {self.left():,} are left")
        self.pos += n
        return self.pos - n

    def number(self, fmt: str, what: str):
        dt = np.dtype(fmt)
        return np.frombuffer(self.buf, dt, 1, self.take(dt.itemsize, what))[0].item()

    def count(self, item_bytes: int, what: str) -> int:
        """A u64 count of items of at least item_bytes each, bounded by the bytes left."""
        n = self.number("<u8", what)
        if n * item_bytes > self.left():
            raise ValueError(f"{what} {n:,} at byte {self.pos - 8} cannot fit in the {self.left():,} bytes left")
        return n

    def string(self, what: str) -> str:
        n = self.number("<u8", f"length of {what}")
        pos = self.take(n, what)
        try:
            return bytes(self.buf[pos:pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} at byte {pos} is not UTF-8") from None

    def vtype(self, what: str) -> GGUFValueType:
        v = self.number("<u4", what)
        if v not in _NUMBERS and v not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            raise ValueError(f"{what} {v} at byte {self.pos - 4} is not a GGUF value type")
        return GGUFValueType(v)

    def value(self, vtype: GGUFValueType, key: str):
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key}")
        return self.number(_NUMBERS[vtype], f"value of {key}")

    def array(self, sub: GGUFValueType, key: str) -> list:
        if sub == GGUFValueType.STRING:
            return [self.string(f"an element of {key}") for _ in range(self.count(8, f"length of {key}"))]
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"{key}: arrays of arrays are not read")
        dt = np.dtype(_NUMBERS[sub])
        n = self.count(dt.itemsize, f"length of {key}")
        return np.frombuffer(self.buf, dt, n, self.take(n * dt.itemsize, key)).tolist()


_NUMBERS = {vtype: np.dtype(t).newbyteorder("<") for vtype, t in GGUFReader.gguf_scalar_to_np.items()}
_MIN_KV, _MIN_TENSOR = 13, 32  # bytes of the smallest key-value pair and tensor info
MAX_DIMS = 4                   # GGML_MAX_DIMS


class PlainReader(GGUFReader):
    """gguf.GGUFReader whose arrays are plain numpy views of the mapping, not np.memmap ones: the memmap
    subclass's per-view bookkeeping made reading a 49K-token vocabulary's fields three times slower (the
    1.5B study model's file: 15.5 s -> 5.4 s). Same fields, same tensor data."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._data = mapped.view(np.ndarray)


def read_header(path) -> tuple[list[tuple[str, object, GGUFValueType, GGUFValueType | None]],
                               list[tuple[str, tuple[int, ...], int]]]:
    """All metadata (key, value, value type, array element type) and tensor infos (name, shape, type).

    gguf.GGUFReader builds a numpy view per array element: ~6 s for a 49K-token vocabulary. This
    reads the header sequentially instead (numbers via numpy, strings by offset), in ~0.1 s. Anything
    malformed, or a tensor whose data the file is too short to hold, is one UserError naming the file.
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise ValueError("shorter than a GGUF header")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # only the header's pages are read
        return _parse(memoryview(mapped))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None


def _parse(buf: memoryview):
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("no GGUF magic number")
    c = _Cursor(buf, 4)
    version = c.number("<u4", "version")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; versions 2 and 3 are read")
    n_tensors, n_kv = c.number("<u8", "tensor count"), c.number("<u8", "key count")
    if n_tensors * _MIN_TENSOR + n_kv * _MIN_KV > c.left():
        raise ValueError(f"{n_tensors:,} tensors and {n_kv:,} keys cannot fit in {len(buf):,} bytes")
    out = []
    for _ in range(n_kv):
        key = c.string("a key")
        vtype = c.vtype(f"type of {_short(key)}")
        if vtype == GGUFValueType.ARRAY:
            sub = c.vtype(f"element type of {_short(key)}")
            out.append((key, c.array(sub, _short(key)), vtype, sub))
        else:
            out.append((key, c.value(vtype, _short(key)), vtype, None))
    infos = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        shown = _short(name)
        n_dims = c.number("<u4", f"dimension count of {shown}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"tensor {shown} has {n_dims} dimensions (1 to {MAX_DIMS} are valid)")
        shape = tuple(c.number("<u8", f"shape of {shown}") for _ in range(n_dims))
        infos.append((name, shape, c.number("<u4", f"type of {shown}"), c.number("<u8", f"data offset of {shown}")))
    _check_data(infos, dict((k, v) for k, v, *_ in out).get("general.alignment", 32), c.pos, len(buf))
    return out, [info[:3] for info in infos]


def _short(name: str) -> str:
    """A name read from the file as shown in a message: a hostile one may be megabytes long."""
    return name if len(name) <= 80 else name[:77] + "..."


def _check_data(infos: list, alignment, header_end: int, size: int) -> None:
    """Every tensor's type is known and its data lies inside the file."""
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {_short(repr(alignment))} is not a power of two")
    start = -(-header_end // alignment) * alignment
    if len({name for name, *_ in infos}) != len(infos):
        raise ValueError("two tensors share a name")
    for full, shape, ttype, offset in infos:
        name = _short(full)
        if ttype not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name} has unknown type {ttype}")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        if min(shape) < 1 or shape[0] % block:
            raise ValueError(f"tensor {name} has shape {list(shape)}, impossible for its type")
        end = start + offset + math.prod(shape) // block * type_size
        if end > size:
            raise ValueError(f"tensor {name}'s data ends at byte {end:,}, past the end of the file ({size:,} bytes)")


def _positive(v, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{key} is {_short(repr(v))}, not a positive integer")
    return v


def per_layer(meta: dict, arch: str, key: str, n_layer: int, default=None) -> list[int]:
    """A shape key as one value per layer: GGUF stores an array when layers differ (deci), else one number."""
    v = meta.get(f"{arch}.{key}", default)
    if isinstance(v, list):
        if len(v) != n_layer:
            raise ValueError(f"{arch}.{key} has {len(v)} values for {n_layer} layers")
        return [_positive(x, f"{arch}.{key}") for x in v]
    return [_positive(v, f"{arch}.{key}")] * n_layer


def layer_shapes(meta: dict, tensors: dict[str, tuple[int, ...]]) -> tuple[list[LayerShape], int, int]:
    """Every layer's (n_head, n_kv_head, ffn_dim), and the K and V head sizes, from GGUF metadata.

    `tensors` (name -> shape, ggml order) bounds the layer count before lists are built, and for the
    architectures we read, every weight must have the shape the metadata implies (ValueError if not):
    a loader would otherwise allocate what the metadata claims.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("general.architecture is missing")
    n_layer = _positive(meta.get(f"{arch}.block_count"), f"{arch}.block_count")
    if n_layer > len(tensors):
        raise ValueError(f"{arch}.block_count is {n_layer:,} but the file holds {len(tensors)} tensors")
    n_head = per_layer(meta, arch, "attention.head_count", n_layer)
    n_kv = per_layer(meta, arch, "attention.head_count_kv", n_layer, meta.get(f"{arch}.attention.head_count"))
    ffn = per_layer(meta, arch, "feed_forward_length", n_layer)
    n_embd = _positive(meta.get(f"{arch}.embedding_length"), f"{arch}.embedding_length")
    k_len = _positive(meta.get(f"{arch}.attention.key_length", max(n_embd // max(n_head), 1)), "key_length")
    v_len = _positive(meta.get(f"{arch}.attention.value_length", k_len), "value_length")
    shapes = [LayerShape(*row) for row in zip(n_head, n_kv, ffn)]
    if arch in GRAPHS:  # the graphs we write and read: their weights' shapes are checked
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list) else tensors.get("token_embd.weight", (0, 0))[-1]
        for name, want in _weight_shapes(shapes, n_embd, k_len, v_len, n_vocab).items():
            if name not in tensors and name != "output.weight":
                raise ValueError(f"tensor {name} is missing")
            if tensors.get(name, want) != want:
                raise ValueError(f"tensor {name} has shape {list(tensors[name])}; the metadata implies {list(want)}")
    return shapes, k_len, v_len


def _weight_shapes(shapes: list[LayerShape], n_embd: int, k_len: int, v_len: int, n_vocab: int) -> dict:
    """name -> ggml shape (columns first) of every weight of a llama-style graph."""
    want = {"token_embd.weight": (n_embd, n_vocab), "output.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    for il, s in enumerate(shapes):
        q, k, v = s.n_head * k_len, s.n_kv_head * k_len, s.n_kv_head * v_len
        want |= {f"blk.{il}.{name}.weight": shape for name, shape in (
            ("attn_norm", (n_embd,)), ("ffn_norm", (n_embd,)), ("attn_q", (n_embd, q)), ("attn_k", (n_embd, k)),
            ("attn_v", (n_embd, v)), ("attn_output", (s.n_head * v_len, n_embd)), ("ffn_gate", (n_embd, s.ffn_dim)),
            ("ffn_up", (n_embd, s.ffn_dim)), ("ffn_down", (s.ffn_dim, n_embd)))}
    return want
