"""The model a GGUF file holds, read back for `export --verify` by code independent of the exporter.

Every tensor is read with gguf.GGUFReader and dequantized with gguf.quants.dequantize (any type gguf-py
reads: F32/F16/BF16, legacy blocks, K-quants, i-quants), renamed to the model's parameter by gguf-py's
name table, and Q/K rows of an adjacent-pair rope graph are put back in rotate_half order by an index
map built here (not the exporter's reshape: a shared permutation would cancel a permutation bug).

Two facts follow. (1) Weights: each row read back must equal the model's row up to the rounding of its
type. The allowance is that rounding's size on the model's own row: the cast for F16/BF16; for block
types, symmetric round-to-nearest 4-bit per 32 weights (Q4_0's 4.5 bits per weight) scaled by
2^(4.5 - the type's bits per weight), since each bit halves a round-to-nearest error (K- and i-quants
fit better than round-to-nearest at equal bits). A ratio near 1 is the type's own rounding; a wrong,
swapped or missing row is about the row's own norm, tens of allowances and more.
(2) The read-back model is what llama.cpp should compute: logits then differ only by the runtime's
arithmetic (see rounding.py), unless metadata (norm epsilon, rope base, head counts) is wrong, which
the weights cannot show.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transact_edge.arch import GRAPHS, ROTARY
from transact_edge.exporters.rounding import rtn_error
from transact_edge.ggufmap import PlainReader
from transact_edge.shapes import head_dim, layer_shapes

WEIGHT_MULTIPLE = 4.0   # a row read back may differ from the model's by this many times its type's rounding
PROXY_BITS, PROXY_BLOCK = 4, 32   # round-to-nearest symmetric 4-bit per 32 weights: Q4_0's 4.5 bits per weight


@dataclass
class TensorCheck:
    name: str              # the model's parameter
    ratio: float           # max over rows of |row read back - model's row| / the row's rounding allowance
    note: str = ""         # what is wrong beyond numbers (missing from the file)


@dataclass
class FileModel:
    model: torch.nn.Module             # float32 copy of the model carrying the file's dequantized tensors
    types: dict[str, tuple[str, int]]  # module name -> (ggml type name, block size) of its weight
    worst: TensorCheck                 # the parameter farthest from the model's, in units of its allowance
    extra: list[str]                   # file tensors no parameter maps to (beyond rope_freqs)
    metadata: list[str]                # hyperparameters the file states otherwise than the model's config


def _metadata_mismatches(reader, arch: str, config) -> list[str]:
    """Norm epsilon and rope base as the file states them against the config, read by their own keys
    (float32 in the file): a wrong one moves logits by less than a quantized type's noise on a small model."""
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    wanted = {gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch): config.rms_norm_eps,
              gguf.Keys.Rope.FREQ_BASE.format(arch=arch): rope.get("rope_theta", getattr(config, "rope_theta", None))}
    wrong = []
    for key, value in wanted.items():
        field = reader.get_field(key)
        stated = None if field is None else float(field.contents())
        if value is not None and (stated is None or not np.isclose(stated, np.float32(value), rtol=1e-6, atol=0)):
            wrong.append(f"{key} {stated} (the model's {value})")
    return wrong


def rotate_half_rows(n_head: int, d: int) -> np.ndarray:
    """For each row of a rotate_half Q/K (head h, dim j), the row of the adjacent-pair layout that holds it:
    pair i of a head is (i, i + d/2) in rotate_half and (2i, 2i + 1) in llama.cpp's NORM rope."""
    j = np.arange(d)
    within = np.where(j < d // 2, 2 * j, 2 * (j - d // 2) + 1)                       # (d,)
    return (np.arange(n_head)[:, None] * d + within[None, :]).reshape(-1)           # (n_head * d,)


def allowance(w: np.ndarray, type_name: str, block: int, type_bytes: int) -> np.ndarray:
    """Per row of w (rows, cols), the size of the rounding a tensor of `type_name` gives that row: the cast
    itself for float types, else round-to-nearest at the type's bits per weight (`type_bytes` per `block`)."""
    floor = 1e-6 * np.linalg.norm(w, axis=-1) + 1e-12
    if type_name in ("F16", "BF16"):
        back = torch.from_numpy(w).to({"F16": torch.float16, "BF16": torch.bfloat16}[type_name]).float().numpy()
        return np.linalg.norm(back - w, axis=-1) + floor
    if type_name == "F32":
        return floor
    return rtn_error(w, PROXY_BITS, PROXY_BLOCK) * 2.0 ** (PROXY_BITS + 0.5 - 8 * type_bytes / block) + floor


def _unpermute(key: str, data: np.ndarray, config) -> np.ndarray:
    """Q/K rows (weight or bias) back from adjacent pairs to rotate_half, with the layer's own head count."""
    il = int(key.split(".")[2])
    shape = layer_shapes(config)[il]
    return data[rotate_half_rows(getattr(shape, ROTARY[key.split(".")[-2]]), head_dim(config))]


def read_back(model: torch.nn.Module, gguf_path: Path) -> FileModel:
    """A float32 copy of `model` whose parameters are the file's tensors, and how far each is from the model's."""
    import gguf

    reader = PlainReader(gguf_path)
    arch = str(reader.get_field("general.architecture").contents())
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    ref, types, checks, used = copy.deepcopy(model).float().eval(), {}, [], {"rope_freqs.weight"}
    with torch.no_grad():
        for key, p in ref.named_parameters():          # a tied head is the embedding's parameter: read once
            t = tensors.get(names.get_name(key, try_suffixes=(".weight", ".bias")) or "")
            if t is None:
                checks.append(TensorCheck(key, float("inf"), "missing from the file"))
                p.zero_()
                continue
            used.add(t.name)
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape).astype(np.float32)
            if GRAPHS[arch].norm_rope and key.split(".")[-2] in ROTARY:
                data = _unpermute(key, data, model.config)
            own = p.detach().numpy().reshape(-1, p.shape[-1])
            err = np.linalg.norm(data.reshape(own.shape) - own, axis=-1)
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            checks.append(TensorCheck(key, float((err / allowance(own, t.tensor_type.name, block, size)).max())))
            p.copy_(torch.from_numpy(np.ascontiguousarray(data)))
            if key.endswith(".weight") and p.dim() == 2:
                types[key.removesuffix(".weight")] = (t.tensor_type.name, block)
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in types:
        types["lm_head"] = types.get("model.embed_tokens", ("F32", 1))
    types.pop("model.embed_tokens", None)               # a lookup, not a matmul: no activation rounding
    return FileModel(ref, types, max(checks, key=lambda c: c.ratio), sorted(set(tensors) - used),
                     _metadata_mismatches(reader, arch, model.config))
