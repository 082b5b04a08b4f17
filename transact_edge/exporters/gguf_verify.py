"""`export --verify` for GGUF: is the file exact, and how far does the runtime drift as users run it?

Exactness: llama.cpp with flash attention off and an F32 KV cache, against the PyTorch model in
float32 with each weight rounded by the type the file stores it in (gguf-py quantize -> dequantize,
in transformers' layout: a row's blocks do not depend on the order of the rows, so no name or row
mapping is involved and a wrong mapping in the file cannot cancel out). Only llama.cpp's own
arithmetic differs then, and llama.cpp's CPU dot products round the activations to the weight's type
(F16, BF16) or to 8 bits (quantized types); F32 files compute in float32. EXACT bounds the largest
|Δlogit| relative to the largest |logit|, per weight type, measured with margin (2026-11-30: tiny
Llama/Mistral/Qwen2 and 50%-pruned SmolLM2, 256 tokens: F32 <= 2.3e-6, F16 <= 1.3e-3, BF16 <= 1.6e-2,
Q8_0 <= 3.5e-2, Q4_0 <= 3.7e-2); a wrong mapping moves logits by their own size. A failed exactness
check fails the export (exit 1). K-quants come from llama-quantize, whose rounding
gguf-py cannot reproduce: their exactness is not checked, only reported as drift.

Deployment drift: the settings users run (flash attention on, which llama.cpp needs to allocate a
per-layer KV cache exactly, and an F16 KV cache) against the same reference, with its perplexity
change, on its own line. Drift alone never fails an export.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transact_edge.ggufmap import read_header

# exactness: the largest |Δlogit| allowed, relative to the reference's largest |logit|, by weight type
EXACT = {"F32": 1e-3, "F16": 4e-3, "BF16": 5e-2}
EXACT_QUANTIZED = 0.1


@dataclass
class Verification:
    exact: object | None       # compare.Agreement, llama.cpp (FA off, F32 KV) vs the rounded reference
    drift: object              # compare.Agreement, llama.cpp as deployed (FA on, F16 KV) vs the same reference
    outtype: str
    passed: bool | None        # None: exactness not checkable (K-quants)
    rule: str

    @property
    def agreement(self):
        """The deployed runtime's agreement (what earlier versions reported)."""
        return self.drift

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "not checked"}[self.passed]
        exact = (f"verify {self.outtype} exact (flash attention off, F32 KV): "
                 f"{self.exact.line(('torch', 'llama.cpp')) if self.exact else 'K-quant rounding not reproducible'}"
                 f" -> {verdict} ({self.rule})")
        drift = (f"verify {self.outtype} deployment drift (flash attention on, F16 KV): "
                 f"{self.drift.line(('torch', 'llama.cpp'))}")
        return f"{exact}\n{drift}"


def rounded(model, gguf_path: Path):
    """A float32 copy of `model` whose weights carry the rounding of the file's tensor types, or None
    when a type cannot be reproduced by gguf-py (K-quants)."""
    import gguf

    kv, tensors = read_header(gguf_path)
    meta = {k: v for k, v, *_ in kv}
    arch = meta["general.architecture"]
    types = {name: gguf.GGMLQuantizationType(t) for name, _, t in tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], meta[f"{arch}.block_count"])
    ref = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for key, p in ref.named_parameters():  # a tied output head is the embedding's parameter: done once
            qtype = types.get(names.get_name(key, try_suffixes=(".weight", ".bias")))
            if qtype is None or qtype.name == "F32":  # (a tensor the file lacks shows in the logits)
                continue
            w = p.detach().numpy()
            try:
                back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
            except NotImplementedError:
                return None
            p.copy_(torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32).reshape(w.shape)))
    return ref


def verify(gguf_path: Path, model, tokenizer, outtype: str, n_tokens: int = 512) -> Verification:
    """Exactness and deployment drift on the first `n_tokens` of the held-out text."""
    from transact_edge import corpus
    from transact_edge.compare import agreement
    from transact_edge.runtimes import open_runtime

    ids = corpus.stream(tokenizer, corpus.DEFAULT, "eval")[:n_tokens]
    reference = rounded(model, gguf_path)
    with torch.inference_mode():
        ref = (reference or model.float())(input_ids=ids[None]).logits[0].float()  # (T, V)

    def run(flash_attn: bool, kv_type: str) -> torch.Tensor:
        session = open_runtime("llama.cpp", gguf_path, n_ctx=n_tokens, flash_attn=flash_attn, kv_type=kv_type)
        try:
            return session.logits(ids[None])[0]
        finally:
            session.close()

    drift = agreement(ref, run(True, "f16"), ids)
    if reference is None:
        return Verification(None, drift, outtype, None, "reported only")
    exact = agreement(ref, run(False, "f32"), ids)
    rel = max(EXACT.get(t, EXACT_QUANTIZED) for t in _weight_types(gguf_path))
    bound = rel * float(ref.abs().max())
    return Verification(exact, drift, outtype, exact.max_abs_diff <= bound,
                        f"max abs Δlogit <= {bound:.3g}, {rel:g} x max abs logit")


def _weight_types(gguf_path: Path) -> set[str]:
    import gguf

    return {gguf.GGMLQuantizationType(t).name for _, shape, t in read_header(gguf_path)[1] if len(shape) > 1}
