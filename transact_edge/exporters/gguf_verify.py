"""`export --verify` for GGUF: is the file exact, and how far does the runtime drift as users run it?

Exactness, for every tensor type gguf-py can dequantize (K-quants and i-quants included), in two facts
(gguf_reference): the file's tensors, read back and mapped to the model's layout by code of their own,
equal the model's weights up to their type's rounding (each row within WEIGHT_MULTIPLE x that
rounding); and llama.cpp with flash attention off and an F32 KV cache computes what PyTorch computes on
those tensors, up to NOISE_MULTIPLE x the model's own float noise on the same tokens (rounding: PyTorch
with llama.cpp's activation rounding emulated, against float64). Both bounds are measured per model
and per file at run time, and the verify line prints them and where they came from. `score` is the
larger of the two errors in units of its bound: a correct file scores <= 1. A failed exactness check
fails the export (exit 1).

Deployment drift: the settings users run (flash attention on, which llama.cpp needs to allocate a
per-layer KV cache exactly, and an F16 KV cache) against the same reference, with its perplexity
change, on its own line. Drift alone never fails an export.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from transact_edge.exporters.gguf_reference import WEIGHT_MULTIPLE, TensorCheck, read_back
from transact_edge.exporters.rounding import activation_rounding, float_noise


@dataclass
class Verification:
    exact: object              # compare.Agreement, llama.cpp (FA off, F32 KV) vs PyTorch on the file's tensors
    drift: object              # compare.Agreement, llama.cpp as deployed (FA on, F16 KV) vs the same reference
    outtype: str
    passed: bool
    rule: str
    weights: TensorCheck       # the tensor farthest from the model's own, in units of its type's rounding
    score: float               # the larger error in units of its bound (<= 1 passes)

    @property
    def agreement(self):
        """The deployed runtime's agreement (what earlier versions reported)."""
        return self.drift

    def line(self) -> str:
        exact = (f"verify {self.outtype} exact (flash attention off, F32 KV): "
                 f"{self.exact.line(('torch', 'llama.cpp'))} -> {'PASS' if self.passed else 'FAIL'} ({self.rule})")
        drift = (f"verify {self.outtype} deployment drift (flash attention on, F16 KV): "
                 f"{self.drift.line(('torch', 'llama.cpp'))}")
        return f"{exact}\n{drift}"


def verify(gguf_path: Path, model, tokenizer, outtype: str, n_tokens: int = 512) -> Verification:
    """Exactness and deployment drift on the first `n_tokens` of the held-out text."""
    from transact_edge import corpus
    from transact_edge.compare import agreement
    from transact_edge.runtimes import open_runtime

    ids = corpus.stream(tokenizer, corpus.DEFAULT, "eval")[:n_tokens]
    held = read_back(model, gguf_path)
    noise = float_noise(held.model, ids, {m: activation_rounding(*t) for m, t in held.types.items()})

    def run(flash_attn: bool, kv_type: str) -> torch.Tensor:
        session = open_runtime("llama.cpp", gguf_path, n_ctx=n_tokens, flash_attn=flash_attn, kv_type=kv_type)
        try:
            return session.logits(ids[None])[0]
        finally:
            session.close()

    exact = agreement(noise.exact, run(False, "f32"), ids)
    drift = agreement(noise.exact, run(True, "f16"), ids)
    w = held.worst
    score = max(exact.max_abs_diff / max(noise.bound, 1e-30), w.ratio / WEIGHT_MULTIPLE,
                float("inf") if held.metadata else 0.0)
    weights = (f"weights: {w.name} {w.note or f'{w.ratio:.3g} x its type rounding'} (worst; <= {WEIGHT_MULTIPLE:g})"
               + (f"; file tensors the model lacks: {', '.join(held.extra)}" if held.extra else "")
               + (f"; metadata differs: {', '.join(held.metadata)}" if held.metadata else ""))
    return Verification(exact, drift, outtype, score <= 1 and not held.extra, f"{noise.rule()}; {weights}", w, score)
