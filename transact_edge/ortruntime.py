"""onnxruntime runtime for our ONNX graphs: prefill, decode, generation with a per-layer KV cache.

The past shapes are read from the session's inputs (each layer's KV heads and head_dim), so
graphs whose layers differ run as well as uniform ones.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from transact_edge.errors import UserError


class OrtModel:
    def __init__(self, path: Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed (pip install onnxruntime)") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or os.cpu_count() or 1
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"{path}: onnxruntime cannot load this file ({type(e).__name__})") from None
        inputs = self.session.get_inputs()
        self.past = [(i.name, int(i.shape[1]), int(i.shape[3])) for i in inputs if i.name.startswith("past_key_values.")]
        self.kv_dtype = np.float16 if "float16" in inputs[3].type else np.float32
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, heads, 0, hd), self.kv_dtype) for name, heads, hd in self.past}

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits (B, T, V) for `ids` (B, T) after `past`; returns the new past too."""
        b, t = ids.shape
        p = next(iter(past.values())).shape[2] if past else 0
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, p + t), np.int64),
                "position_ids": np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy(), **past}
        logits, *present = self.session.run(self.outputs, feed)
        return logits, {name.replace("present.", "past_key_values."): v for name, v in zip(self.outputs[1:], present)}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of whole sequences from an empty cache (perplexity, verification)."""
        out, _ = self.forward(ids.numpy(), self.empty_past(ids.shape[0]))
        return torch.from_numpy(out.astype(np.float32))

    def generate(self, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> Iterator[int]:
        """Greedy tokens one by one (streaming), through the graph's own KV cache."""
        logits, past = self.forward(np.array([prompt]), self.empty_past(1))
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            yield token
            if token == eos:
                return
            logits, past = self.forward(np.array([[token]]), past)
