"""Stock llama.cpp through llama-cpp-python: open a GGUF, get logits, read what llama.cpp reports.

llama.cpp prints the KV-cache size it allocated ("llama_kv_cache: size = ... MiB ..., K (f16): ...
MiB, V (f16): ... MiB"); `open_gguf` captures llama.cpp's log while the context is created so
that the number comes from llama.cpp itself, not from our own arithmetic.
"""
from __future__ import annotations

import ctypes
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transact_edge.errors import UserError

KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells.*K \((\w+)\):\s*([\d.]+) MiB, "
                     r"V \((\w+)\):\s*([\d.]+) MiB")


def kv_from_log(text: str) -> dict | None:
    """The KV cache llama.cpp's log reports (the largest, when several contexts were made), or None."""
    found = list(KV_LINE.finditer(text))
    if not found:
        return None
    m = max(found, key=lambda m: int(m[2]))
    return {"mib": float(m[1]), "cells": int(m[2]), "k_type": m[3], "k_mib": float(m[4]), "v_type": m[5],
            "v_mib": float(m[6]), "v_padded": "padding V cache" in text}


@dataclass
class Runtime:
    llm: object                      # llama_cpp.Llama
    log: list[str] = field(default_factory=list)

    def kv_cache(self) -> dict:
        """KV-cache size as llama.cpp reported it when the context was made."""
        kv = kv_from_log("".join(self.log))
        if kv is None:
            raise RuntimeError("llama.cpp did not report a KV-cache size")
        return kv

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) float32 logits of one sequence, evaluated from an empty cache."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def batch_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) logits of B sequences, one after the other (evaluate.perplexity's interface)."""
        return torch.from_numpy(np.stack([self.logits(row.tolist()) for row in ids]))


KV_TYPES = {"f32": 0, "f16": 1}  # ggml type ids (GGML_TYPE_F32, GGML_TYPE_F16)


@contextmanager
def _captured_log(sink: list[str]):
    import llama_cpp
    import llama_cpp._logger as lcl

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        sink.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(lcl.llama_log_callback, ctypes.c_void_p(0))


def open_gguf(path: Path, n_ctx: int = 512, flash_attn: bool = True, threads: int | None = None,
              logits_all: bool = True, kv_type: str = "f16") -> Runtime:
    """A llama.cpp context over a GGUF, by default with logits for every position, flash attention on
    and an F16 KV cache (llama.cpp's defaults); kv_type f32 with flash attention off computes exactly."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    log: list[str] = []
    with _captured_log(log):
        try:
            llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                        flash_attn=flash_attn, n_threads=threads or os.cpu_count(),
                        n_threads_batch=threads or os.cpu_count(), verbose=False, seed=0,
                        type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
        except ValueError as e:
            tail = " | ".join(l.strip() for l in log[-3:])
            raise UserError(f"{path}: llama.cpp cannot load this file ({e}; {tail})") from None
    return Runtime(llm, log)
