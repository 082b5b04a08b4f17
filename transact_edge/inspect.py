"""What a checkpoint or GGUF file holds: per-layer widths, parameters, KV-cache bytes per token."""
from __future__ import annotations

import json
import math
from pathlib import Path

from transact_edge import record
from transact_edge.errors import UserError
from transact_edge.ggufmap import OURS, layer_shapes as gguf_layer_shapes, read_header
from transact_edge.loading import check_weights, read_config, reading, resolve
from transact_edge.shapes import head_dim, kv_bytes_per_token, layer_shapes


def _gguf(path: Path) -> dict:
    import gguf

    kv, tensors = read_header(path)  # the header alone: gguf.GGUFReader takes seconds on a large vocabulary
    meta = {k: v for k, v, *_ in kv}
    try:
        shapes, hd, _ = gguf_layer_shapes(meta, {name: shape for name, shape, _ in tensors})
    except ValueError as e:
        raise UserError(f"{path}: not a model GGUF we read ({e})") from None
    transact = {k: v for k, v in meta.items() if k.startswith(OURS)}
    types = {name: gguf.GGMLQuantizationType(t).name for name, _, t in tensors}
    return {"path": str(path), "format": "gguf", "architecture": meta["general.architecture"], "shapes": shapes,
            "head_dim": hd, "params": sum(math.prod(shape) for _, shape, _ in tensors), "transact": transact or None,
            "tensor_types": types}


def _hf(path: Path) -> dict:
    from safetensors import safe_open

    config = read_config(str(path))
    check_weights(path, config)  # the widths reported are those of the weights
    params, seen = 0, set()
    for f in sorted(path.glob("*.safetensors")):
        with reading(f, "not a readable safetensors file"), safe_open(f, "pt") as st:
            for key in st.keys():
                if key not in seen:
                    seen.add(key)
                    shape = st.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    params += n
    return {"path": str(path), "format": "safetensors", "architecture": config.model_type,
            "shapes": layer_shapes(config), "head_dim": head_dim(config), "params": params,
            "record": record.read(path)}


def describe(source: str, kv_ctx: int = 0) -> dict:
    """Widths, parameters, KV bytes; for a GGUF and kv_ctx > 0 also the KV cache llama.cpp allocates."""
    path = resolve(source)
    info = _gguf(path) if path.is_file() else _hf(path)
    info["kv_bytes_per_token_f16"] = kv_bytes_per_token(info["shapes"], info["head_dim"])
    if path.is_file() and kv_ctx > 0:
        from transact_edge.llamacpp import open_gguf

        rt = open_gguf(path, n_ctx=kv_ctx, flash_attn=True)
        info["llama_cpp_kv"] = rt.kv_cache() | {"n_ctx": kv_ctx,
                                                "expected_mib": info["kv_bytes_per_token_f16"] * kv_ctx / 2**20}
        rt.llm.close()
    return info


def render(info: dict) -> str:
    shapes = info["shapes"]
    lines = [f"{info['path']}: {info['format']}, architecture {info['architecture']}, {len(shapes)} layers, "
             f"head_dim {info['head_dim']}",
             f"parameters: {info['params']:,}",
             f"KV cache (f16): {info['kv_bytes_per_token_f16']:,} bytes per token",
             "", "layer  n_head  n_kv_head  ffn_dim  kv_bytes/token"]
    for il, s in enumerate(shapes):
        lines.append(f"{il:5d}  {s.n_head:6d}  {s.n_kv_head:9d}  {s.ffn_dim:7d}  "
                     f"{kv_bytes_per_token([s], info['head_dim']):14d}")
    if info.get("tensor_types"):
        lines += ["", *_type_table(info["tensor_types"], len(shapes))]
    if info.get("llama_cpp_kv"):
        kv = info["llama_cpp_kv"]
        lines += ["", f"llama.cpp KV cache at n_ctx {kv['n_ctx']} (flash attention on): {kv['mib']:.2f} MiB "
                      f"(K {kv['k_mib']:.2f} + V {kv['v_mib']:.2f}); per-layer sum: {kv['expected_mib']:.2f} MiB"]
    if info.get("transact"):
        lines += ["", "transact: " + json.dumps(info["transact"], default=str)]
    if info.get("record"):
        lines += ["", _record_line(info["record"])]
    return "\n".join(lines)


def _record_line(r: record.Record) -> str:
    """What transact.json says was done (inspect --json prints all of it)."""
    recovered = sum((s.recovery or {}).get("tokens", 0) for s in r.shots)
    how = "replayed " + r.replayed["plan"] if r.replayed else f"{len(r.shots)} shot(s), metric {r.options.get('metric')}"
    return (f"{record.FILE} ({r.schema}): pruned from {r.source.model} ({r.source.model_type}), {how}, "
            f"{r.calibration.tokens} calibration tokens, {recovered:,} recovery tokens, "
            f"parameters {r.dense.params} -> {r.pruned.params if r.pruned else None}")


def _type_table(types: dict[str, str], n_layer: int) -> list[str]:
    """Each tensor's storage type: one row per layer for its weights, then the other tensors (norms, biases:
    F32 as llama.cpp keeps them, listed once)."""
    kinds = sorted({n.split(".")[2] for n in types if n.startswith("blk.") and n.endswith(".weight")
                    and not n.split(".")[2].endswith("norm")})
    lines = ["tensor types", "layer  " + "  ".join(f"{k:>11}" for k in kinds)]
    for il in range(n_layer):
        lines.append(f"{il:5d}  " + "  ".join(f"{types.get(f'blk.{il}.{k}.weight', '-'):>11}" for k in kinds))
    shown = {f"blk.{il}.{k}.weight" for il in range(n_layer) for k in kinds}
    rest = sorted({f"{n if not n.startswith('blk.') else '*.' + '.'.join(n.split('.')[2:])} {t}"
                   for n, t in types.items() if n not in shown})
    return lines + ["other tensors: " + ", ".join(rest)]


def as_json(info: dict) -> str:
    d = dict(info, shapes=[s.as_dict() for s in info["shapes"]])
    if info.get("record"):  # transact.json as the record writes it, schema (`format`) included
        d["record"] = info["record"].to_json()
    return json.dumps(d, indent=1, default=str)
