"""Importance matrices for llama-quantize: checked when given, computed in PyTorch for `--imatrix auto`.

The importance matrix holds, per weight, the sum over calibration tokens of each input column's
squared activation, and the token count: what llama-imatrix collects from every matrix product with
a `blk.*` weight (tools/imatrix/imatrix.cpp, collect_imatrix) and what llama-quantize divides to
weight its rounding. `auto` makes it in one pass of the model being exported over the shipped
calibration text, with hooks on the inputs of q/k/v (one input), o, gate/up (one input) and down,
and writes it as llama-imatrix does: GGUF with `general.type = imatrix`, `<tensor>.in_sum2` (F32,
ne = [columns, 1]), `<tensor>.counts` (F32, ne = [1, 1]) and the `imatrix.datasets`,
`imatrix.chunk_count`, `imatrix.chunk_size` keys that llama-quantize requires. Like llama-imatrix,
it reads chunks of CHUNK tokens and puts BOS first in each when the model's tokenizer adds one.
For o_proj and down_proj these sums are exactly TransAct's salience statistic (calibration.py).
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from transact_edge import corpus
from transact_edge.calibration import accumulator
from transact_edge.errors import UserError
from transact_edge.ggufmap import read_header
from transact_edge.shapes import head_dim, layer_shapes

CHUNK = 512        # llama-imatrix's default context
AUTO_CHUNKS = 64   # 32K tokens of the shipped calibration pages
# GGUF weight -> (HF module path in a layer, its input width: "hidden", "attn" (heads x head_dim) or "ffn")
WEIGHTS = {"attn_q": ("self_attn.q_proj", "hidden"), "attn_k": ("self_attn.k_proj", "hidden"),
           "attn_v": ("self_attn.v_proj", "hidden"), "attn_output": ("self_attn.o_proj", "attn"),
           "ffn_gate": ("mlp.gate_proj", "hidden"), "ffn_up": ("mlp.up_proj", "hidden"),
           "ffn_down": ("mlp.down_proj", "ffn")}
SHARED_INPUT = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}


def expected_sizes(config) -> dict[str, int]:
    """Each `blk.*` weight's row length (what an imatrix entry must hold) for a model config."""
    hd, sizes = head_dim(config), {}
    for il, s in enumerate(layer_shapes(config)):
        width = {"hidden": config.hidden_size, "attn": s.n_head * hd, "ffn": s.ffn_dim}
        sizes |= {f"blk.{il}.{name}.weight": width[kind] for name, (_, kind) in WEIGHTS.items()}
    return sizes


def read_sizes(path: Path) -> dict[str, int]:
    """Entry name -> number of values, from a GGUF imatrix or a legacy .dat; one line when it is neither."""
    if not path.is_file():
        raise UserError(f"--imatrix {path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"--imatrix {path}: cannot read it ({e.strerror})") from None
    try:
        return _gguf_sizes(path) if magic == b"GGUF" else _dat_sizes(path.read_bytes())
    except (ValueError, KeyError, IndexError, struct.error, OSError) as e:
        raise UserError(f"--imatrix {path}: not an importance matrix llama-quantize reads ({e})") from None


def _gguf_sizes(path: Path) -> dict[str, int]:
    kv, tensors = read_header(path)
    keys = {k for k, *_ in kv}
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in keys]
    if missing:
        raise ValueError(f"no {', '.join(missing)} metadata")
    sums = {name[:-len(".in_sum2")]: math.prod(shape) for name, shape, _ in tensors if name.endswith(".in_sum2")}
    if not sums:
        raise ValueError("no .in_sum2 entries")
    return sums


def _dat_sizes(data: bytes) -> dict[str, int]:
    """The legacy format: int32 entries, then per entry name length, name, ncall, nval, nval floats."""
    (n,), pos, sizes = struct.unpack_from("<i", data), 4, {}
    if n < 1:
        raise ValueError("no entries")
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + length].decode()
        _, nval = struct.unpack_from("<ii", data, pos + 4 + length)
        pos += 12 + length + 4 * nval
        if nval < 1 or pos > len(data):
            raise ValueError(f"entry {name!r} is cut short")
        sizes[name] = nval
    return sizes


def check_file(path: Path, config, required: bool) -> None:
    """Refuse an imatrix made for another model: an entry whose size differs from its tensor's row (llama-
    quantize aborts mid-file on it), or, for types that need one, a weight it has no entry for."""
    sizes, want = read_sizes(path), expected_sizes(config)
    for name, n in sizes.items():
        if name in want and n != want[name]:
            raise UserError(f"--imatrix {path}: made for another model ({name} has {n} values, this model's rows "
                            f"have {want[name]})")
    lacking = [name for name in want if name not in sizes]
    if required and lacking:
        raise UserError(f"--imatrix {path}: made for another model (no entry for {lacking[0]} and "
                        f"{len(lacking) - 1} more weights)")


@torch.inference_mode()
def collect(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[dict[str, torch.Tensor], int]:
    """Sums of squared inputs (float64) of every `blk.*` weight over `windows` (N, T); and the token count."""
    sums, handles = {}, []
    for il, layer in enumerate(model.model.layers):
        shared: dict[str, torch.Tensor] = {}  # q/k/v and gate/up see one input: hook it once
        for name, (path, _) in WEIGHTS.items():
            module = layer.get_submodule(path)
            key = SHARED_INPUT.get(name, name)
            if key not in shared:
                shared[key] = torch.zeros(module.in_features, dtype=torch.float64)
                handles.append(module.register_forward_pre_hook(accumulator(shared[key])))
            sums[f"blk.{il}.{name}.weight"] = shared[key]
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            model.model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums, int(windows.numel())


def write(path: Path, sums: dict[str, torch.Tensor], tokens: int, chunk: int, datasets: list[str]) -> None:
    """The GGUF imatrix llama-imatrix writes (save_imatrix): raw sums and counts, names sorted."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix's files have none
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", datasets)
    writer.add_uint32("imatrix.chunk_count", tokens // chunk)
    writer.add_uint32("imatrix.chunk_size", chunk)
    for name in sorted(sums):
        writer.add_tensor(f"{name}.in_sum2", sums[name].to(torch.float32).numpy()[None, :])  # ne [cols, 1]
        writer.add_tensor(f"{name}.counts", np.array([[tokens]], dtype=np.float32))          # ne [1, 1]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def calibration_windows(tokenizer, bos: int | None, n: int = AUTO_CHUNKS, chunk: int = CHUNK) -> torch.Tensor:
    """The first `n` chunks of the shipped calibration pages, BOS first in each when the model adds one."""
    windows = corpus.windows(corpus.stream(tokenizer, corpus.DEFAULT, "train"), chunk, n).clone()
    if bos is not None:
        windows[:, 0] = bos
    return windows


def add_bos(gguf_path: Path) -> int | None:
    """The BOS id llama.cpp puts first in each chunk of this GGUF, or None when its tokenizer adds none."""
    meta = {k: v for k, v, *_ in read_header(gguf_path)[0]}
    return meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None


def auto(checkpoint: str, staged: Path, out: Path, chunks: int = AUTO_CHUNKS) -> None:
    """`--imatrix auto`: one calibration pass of the checkpoint in PyTorch (BOS as the `staged` GGUF adds it),
    written to `out`."""
    from transact_edge.loading import load

    loaded = load(checkpoint)
    model = loaded.model.float()
    windows = calibration_windows(loaded.tokenizer, add_bos(staged), chunks)
    sums, tokens = collect(model, windows)
    write(out, sums, tokens, CHUNK, [f"transact-edge auto: {corpus.DEFAULT} train pages, "
                                     f"{windows.shape[0]} x {CHUNK} tokens"])
