"""Rope scaling between transformers' `config.rope_parameters` and GGUF, as llama.cpp's graphs read it.

- llama3 (Llama 3.1/3.2): llama.cpp's converter writes no scaling keys; the `llama` and `deci` graphs
  divide each rotary frequency by the F32 tensor `rope_freqs.weight` (head_dim/2 divisors: 1 for
  wavelengths below original_context/high_freq_factor, `factor` above original_context/low_freq_factor,
  a smooth blend between). We write that tensor and, so that our importer gets the parameters back
  exactly, `transact.rope.llama3.*`. A file without those keys (llama.cpp's converter) has its
  parameters fitted to the tensor with Llama 3.x's low/high frequency factors 1 and 4.
- linear: `rope.scaling.type` linear + `rope.scaling.factor` (llama.cpp scales positions by 1/factor).
- yarn: type, factor, `rope.scaling.original_context_length`, and `rope.scaling.attn_factor` relative
  to YaRN's own 0.1 ln(factor) + 1. This llama.cpp reads no beta keys (it uses 32 and 1), so other
  betas are refused, as are untruncated correction ranges.
Other types (dynamic, longrope, ...) are refused: no llama.cpp graph we write runs them.
"""
from __future__ import annotations

import math

import numpy as np

from transact_edge.errors import UserError
from transact_edge.ggufmap import add_ours, ours

ROPE_FREQS = "rope_freqs.weight"
LLAMA3_KEYS = {  # our key (ggufmap.TRANSACT_KEYS) <- rope_parameters field
    "rope.llama3.factor": "factor", "rope.llama3.low_freq_factor": "low_freq_factor",
    "rope.llama3.high_freq_factor": "high_freq_factor",
    "rope.llama3.original_context_length": "original_max_position_embeddings"}
LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def scaling(config) -> dict:
    """The config's rope parameters (rope_type, rope_theta, ...), refusing what llama.cpp cannot run."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.setdefault("rope_type", "default")
    why = None
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        why = "a partial rotary factor"
    elif kind == "yarn" and (params.get("beta_fast") or 32, params.get("beta_slow") or 1) != (32, 1):
        why = "yarn with beta_fast/beta_slow other than 32/1 (llama.cpp reads no beta keys)"
    elif kind == "yarn" and params.get("truncate", True) is False:
        why = "yarn with truncate=False"
    elif kind not in ("default", "linear", "yarn", "llama3"):
        why = f"rope scaling {kind!r}; supported: default, linear, yarn, llama3"
    if why:
        raise UserError(f"the GGUF exporter cannot write {why}")
    if kind == "llama3":
        params = LLAMA3_DEFAULTS | params
        if params["low_freq_factor"] == params["high_freq_factor"]:
            raise UserError("llama3 rope scaling with low_freq_factor == high_freq_factor has no blend to write")
    return params


def _wavelengths(theta: float, n: int) -> np.ndarray:
    """2 pi / frequency of each of the n rotary pairs of a head of 2n dims."""
    return 2 * math.pi * theta ** (np.arange(0, 2 * n, 2, dtype=np.float64) / (2 * n))


def llama3_divisors(params: dict, head_dim: int) -> np.ndarray:
    """(head_dim/2,) float32: what Llama 3 scaling divides each frequency by (transformers' inv_freq ratio)."""
    factor, low, high, ctx = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings"))
    wavelen = _wavelengths(float(params["rope_theta"]), head_dim // 2)
    blend = np.clip((ctx / wavelen - low) / (high - low), 0.0, 1.0)  # 0 above ctx/low, 1 below ctx/high
    return (1.0 / ((1.0 - blend) / factor + blend)).astype(np.float32)


def rope_freqs(config, head_dim: int) -> np.ndarray | None:
    """The rope_freqs.weight tensor a config needs (llama3 only), else None."""
    params = scaling(config)
    return llama3_divisors(params, head_dim) if params["rope_type"] == "llama3" else None


def add_keys(writer, params: dict) -> None:
    """The scaling metadata llama.cpp reads (linear, yarn), and our own llama3 parameters."""
    import gguf

    kind = params["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        ratio = _yarn_attention(params) / _mscale(float(params["factor"]))
        if not math.isclose(ratio, 1.0, rel_tol=1e-7):
            writer.add_rope_scaling_attn_factors(ratio)
    elif kind == "llama3":
        for key, field in LLAMA3_KEYS.items():
            add_ours(writer, key, params[field])


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale for a context `factor` (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention(params: dict) -> float:
    """transformers' YaRN attention factor: given, or from mscale/mscale_all_dim, or from the factor."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor, m, m_all = float(params["factor"]), params.get("mscale"), params.get("mscale_all_dim")
    return _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)


def from_gguf(meta: dict, arch: str, freqs: np.ndarray | None) -> dict:
    """rope_parameters for transformers from a GGUF's `{arch}.rope.*` and `transact.rope.*` keys and its
    rope_freqs tensor (if any)."""
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    if freqs is not None:
        return _llama3_from_gguf(meta, theta, np.asarray(freqs, dtype=np.float32).reshape(-1))
    kind = meta.get(f"{arch}.rope.scaling.type", "linear")  # llama.cpp's default when the key is absent
    factor = float(meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0)) or 1.0)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind == "yarn":
        ctx = meta.get(f"{arch}.rope.scaling.original_context_length", meta.get(f"{arch}.context_length"))
        attn = float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)) * _mscale(factor)
        return {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                "original_max_position_embeddings": int(ctx), "attention_factor": attn}
    raise UserError(f"GGUF rope scaling {kind!r} cannot be loaded; supported: none, linear, yarn, llama3")


def _llama3_from_gguf(meta: dict, theta: float, freqs: np.ndarray) -> dict:
    """llama3 parameters from our keys, else fitted to the tensor; refused unless they reproduce it."""
    stored = {field: meta.get(ours(key)) for key, field in LLAMA3_KEYS.items()}
    if all(v is not None for v in stored.values()):
        params = {"rope_type": "llama3", "rope_theta": theta, **stored}
    else:
        params = _fit_llama3(freqs, theta)
    if params["factor"] == 1.0:  # every divisor 1: plain rope
        return {"rope_type": "default", "rope_theta": theta}
    if not np.allclose(llama3_divisors(params, 2 * len(freqs)), freqs, rtol=1e-5, atol=0):
        raise UserError(f"rope_freqs.weight does not follow llama3 rope scaling {params}; cannot load it")
    return params


def _fit_llama3(freqs: np.ndarray, theta: float) -> dict:
    """llama3 parameters giving `freqs` with Llama 3.x's low/high frequency factors (1, 4): `factor` is the
    largest divisor, the original context follows from the blended pairs (or from the first scaled one)."""
    low, high = LLAMA3_DEFAULTS["low_freq_factor"], LLAMA3_DEFAULTS["high_freq_factor"]
    factor = float(freqs.max())
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": LLAMA3_DEFAULTS["original_max_position_embeddings"]}
    if factor <= 1.0:
        return params | {"factor": 1.0}
    wavelen = _wavelengths(theta, len(freqs))
    blend = (1.0 / freqs - 1.0 / factor) / (1.0 - 1.0 / factor)
    mid = (blend > 1e-6) & (blend < 1 - 1e-6)
    if mid.any():  # blend = (ctx / wavelen - low) / (high - low)
        ctx = np.median(wavelen[mid] * (blend[mid] * (high - low) + low))
    else:  # no pair blended: any context between the last unscaled and the first scaled wavelength
        ctx = np.floor(wavelen[freqs >= factor].min() * low)
    return params | {"original_max_position_embeddings": int(round(float(ctx)))}
