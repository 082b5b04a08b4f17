"""An importance matrix file (llama-imatrix's GGUF, or its legacy .dat): read, checked against a model,
written, and read as TransAct's salience statistics.

Per weight it holds the sum over calibration tokens of each input column's squared activation and the
token count (GGUF: `<tensor>.in_sum2`, F32, ne = [columns, 1]; `<tensor>.counts`; the `imatrix.datasets`,
`imatrix.chunk_count`, `imatrix.chunk_size` keys llama-quantize requires). For attn_output (o_proj) and
ffn_down (down_proj) the sums are exactly TransAct's statistic (calibration.py), so one calibration pass
(llama-imatrix's, or `export --imatrix auto`'s) can drive both the cut (`prune --imatrix`) and the
quantizer; the pruned model's matrix is that file cut to the kept columns (`cut_to`), approximate
because the inputs it summed were the dense model's.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from transact_edge.calibration import Stats
from transact_edge.errors import UserError
from transact_edge.ggufmap import read_header
from transact_edge.shapes import head_dim, layer_shapes

# GGUF weight -> (HF module path in a layer, its input width: "hidden", "attn" (heads x head_dim) or "ffn")
WEIGHTS = {"attn_q": ("self_attn.q_proj", "hidden"), "attn_k": ("self_attn.k_proj", "hidden"),
           "attn_v": ("self_attn.v_proj", "hidden"), "attn_output": ("self_attn.o_proj", "attn"),
           "ffn_gate": ("mlp.gate_proj", "hidden"), "ffn_up": ("mlp.up_proj", "hidden"),
           "ffn_down": ("mlp.down_proj", "ffn")}

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
        return _gguf_sizes(path) if magic == b"GGUF" else {n: len(v) for n, v in _dat_entries(path.read_bytes())}
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


def _dat_entries(data: bytes) -> list[tuple[str, np.ndarray]]:
    """The legacy format: int32 entries, then per entry name length, name, ncall, nval, nval floats."""
    (n,), pos, entries = struct.unpack_from("<i", data), 4, []
    if n < 1:
        raise ValueError("no entries")
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + length].decode()
        _, nval = struct.unpack_from("<ii", data, pos + 4 + length)
        start, pos = pos + 12 + length, pos + 12 + length + 4 * nval
        if nval < 1 or pos > len(data):
            raise ValueError(f"entry {name!r} is cut short")
        entries.append((name, np.frombuffer(data, "<f4", nval, start).astype(np.float64)))
    return entries


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


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_sums(path: Path) -> dict[str, np.ndarray]:
    """Entry name -> per-column sums, float64 (GGUF: in_sum2; legacy .dat: its values); one line when unreadable."""
    read_sizes(path)  # the format checks, with their one-line errors
    if not is_gguf(path):
        return dict(_dat_entries(path.read_bytes()))
    import gguf

    return {t.name[:-len(".in_sum2")]: np.array(t.data, dtype=np.float64).ravel()
            for t in gguf.GGUFReader(path).tensors if t.name.endswith(".in_sum2")}


def stats(path: Path, config) -> Stats:
    """TransAct's statistics (o_proj's and down_proj's input sums, per layer) from an importance matrix made
    for this model: the cut needs no calibration pass of its own."""
    check_file(path, config, required=False)
    sums = read_sums(path)
    n = config.num_hidden_layers
    lacking = [name for il in range(n) for w in ("attn_output", "ffn_down")
               if (name := f"blk.{il}.{w}.weight") not in sums]
    if lacking:
        raise UserError(f"--imatrix {path}: no entry for {lacking[0]} (TransAct needs attn_output and ffn_down "
                        "of every layer)")
    take = lambda w: [torch.from_numpy(sums[f"blk.{il}.{w}.weight"]) for il in range(n)]  # noqa: E731
    return Stats(mha=take("attn_output"), mlp=take("ffn_down"), tokens=0)


def cut_to(path: Path, out: Path, plans, hd: int, what: str) -> None:
    """The GGUF imatrix `path` (made for the dense model) cut to the columns `plans` keep, written to `out`."""
    import gguf

    reader = gguf.GGUFReader(path)
    data = {t.name: np.array(t.data, dtype=np.float64).ravel() for t in reader.tensors}
    sums, tokens = {}, 0
    for name in (k[:-len(".in_sum2")] for k in data if k.endswith(".in_sum2")):
        values, tokens = data[f"{name}.in_sum2"], int(data[f"{name}.counts"][0])
        il, weight = int(name.split(".")[1]), name.split(".")[2]
        if weight == "attn_output":
            values = values.reshape(-1, hd)[plans[il].heads].ravel()
        elif weight == "ffn_down":
            values = values[plans[il].channels]
        sums[name] = torch.from_numpy(values)
    datasets = [*reader.get_field("imatrix.datasets").contents(), what]
    write(out, sums, tokens, int(reader.get_field("imatrix.chunk_size").contents()), datasets)
