"""A runtime's own rounding, emulated in PyTorch, and the float noise it gives one model: the yardstick
every exactness bound of `export --verify` is a multiple of.

llama.cpp's CPU backend converts a matmul's activations to its weight type's `vec_dot_type` before the
dot products (ggml-cpu.c, type_traits_cpu): F16 weights -> F16; BF16 -> BF16; blocks of 32 (Q4_0 ...
Q8_0, IQ4_NL, MXFP4) -> Q8_0/Q8_1 (per 32 values d = absmax/127 stored as F16, q = round(x/d));
super-blocks of 256 (K-quants, i-quants, TQ) -> Q8_K (per 256 values, d in F32); F32 keeps F32.
Everything else (norms, rope, softmax, an F32 KV cache) runs in float32. So the model's own noise is
float32 PyTorch with that rounding applied before each matmul, against float64 PyTorch with none:
large activations (Qwen2's q/k biases) or a deep stack make it larger, and the bound follows them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

Rounding = Callable[[torch.Tensor], torch.Tensor]
NOISE_MULTIPLE = 10.0   # an exactness bound is this many times the model's own measured float noise


def _to(dtype: torch.dtype) -> Rounding:
    return lambda x: x.to(dtype).to(x.dtype)


def int8_blocks(block: int, f16_scale: bool) -> Rounding:
    """Symmetric int8 per `block` values along the last axis (ggml's Q8_0 with an F16 scale, Q8_K with F32)."""
    def rounding(x: torch.Tensor) -> torch.Tensor:
        b = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)                    # (..., n_blocks, block)
        d = b.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, torch.round(b / d.clamp_min(1e-30)), 0.0).clamp(-127, 127)
        return (q * (d.half().to(x.dtype) if f16_scale else d)).reshape(x.shape)
    return rounding


def rtn_error(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Per row of w (N, K), the error of symmetric round-to-nearest `bits` per block of `block` along K."""
    pad = (-w.shape[1]) % block
    b = np.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], -1, block)
    d = np.abs(b).max(-1, keepdims=True) / (2 ** (bits - 1) - 1)
    q = np.clip(np.round(b / np.where(d > 0, d, 1)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return np.linalg.norm((q * d - b).reshape(w.shape[0], -1), axis=-1)


def activation_rounding(weight_type: str, block: int) -> tuple[Rounding | None, str]:
    """What llama.cpp's CPU backend does to a matmul's activations for weights of `weight_type` (a ggml
    type name) stored in blocks of `block`, and its name."""
    if weight_type == "F32":
        return None, "F32"
    if weight_type in ("F16", "BF16"):
        return _to(torch.float16 if weight_type == "F16" else torch.bfloat16), weight_type
    if block == 256:
        return int8_blocks(256, f16_scale=False), "Q8_K"
    return int8_blocks(block, f16_scale=True), "Q8_0"


@contextmanager
def rounded_inputs(model: torch.nn.Module, rounding: dict[str, Rounding]) -> Iterator[None]:
    """Every named module's input rounded as `rounding` says, for the duration."""
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, r=r: (r(args[0]), *args[1:])) for name, r in rounding.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Noise:
    max_abs: float             # max |logit| moved by the emulated runtime rounding (vs the exact reference)
    exact: torch.Tensor        # (T, V) the exact reference's logits (float64 where it fits)
    how: str                   # what was compared, for the verify line

    @property
    def bound(self) -> float:
        return NOISE_MULTIPLE * self.max_abs

    def rule(self, what: str = "max |Δlogit|") -> str:
        return f"{what} <= {self.bound:.3g} = {NOISE_MULTIPLE:g} x the model's own float noise {self.max_abs:.3g} ({self.how})"


@contextmanager
def float64_layer_by_layer(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` in float64 one module at a time: the embedding, each layer, the final norm and the head
    are widened just before their forward and narrowed right after (float32 -> float64 -> float32 is exact),
    so the exact reference costs one layer's float64 copy, not the whole model's (a 1.5B model's is 14 GB).
    Parameters are converted in place (`.data`), so tied weights stay tied."""
    inner = model.model
    parts = [inner.embed_tokens, *inner.layers, inner.norm, model.lm_head]
    dtype = next(model.parameters()).dtype

    def widen(module, args) -> None:
        module.double()

    def narrow(module, args, out) -> None:
        module.to(dtype)

    handles = [h for m in parts for h in (m.register_forward_pre_hook(widen), m.register_forward_hook(narrow))]
    inner.rotary_emb.double()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in (*parts, inner.rotary_emb):
            m.to(dtype)


def float_noise(model: torch.nn.Module, ids: torch.Tensor, rounding: dict[str, tuple[Rounding | None, str]]) -> Noise:
    """`model` (float32) with each module's activation rounding (module name -> (rounding, name)) on
    token ids (T,), against the same weights in float64 (layer by layer) with none."""
    applied = {name: r for name, (r, _) in rounding.items() if r is not None}
    kinds = sorted({label for r, label in rounding.values() if r is not None})
    with torch.inference_mode():
        with float64_layer_by_layer(model):
            exact = model(input_ids=ids[None]).logits[0].double()                      # (T, V)
        with rounded_inputs(model, applied):
            noisy = model(input_ids=ids[None]).logits[0].double()
    how = f"float32 with {'/'.join(kinds) or 'no'} activation rounding vs float64, {ids.numel()} tokens"
    return Noise(float((noisy - exact).abs().max()), exact, how)
