"""One interface over the runtimes a model runs in, picked by name from RUNTIMES (eval, bench):

    session = open_runtime("llama.cpp", "m.gguf", n_ctx=512)
    session.logits(ids)     (B, T) token ids -> (B, T, V) float32 logits, each row from an empty cache
    session.eval(tokens)    append tokens (a 1-D array) to the session's own KV cache: prefill or decode
    session.truncate(n)     keep the first n cached tokens
    session.kv              the KV cache as the runtime reports it (llama.cpp's log), else None
    session.close()

torch runs the checkpoint through transformers; llama.cpp a GGUF through llama-cpp-python (flash
attention on by default, as users run it); onnxruntime an exported graph on the CPU provider;
onnxruntime-genai an exported directory (graph, genai_config.json, tokenizer) as apps run it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from transact_edge.errors import UserError


class TorchSession:
    kv = None

    def __init__(self, path: str, n_ctx: int, threads: int | None = None, **_):
        from transformers import DynamicCache

        from transact_edge.evaluate import torch_logits
        from transact_edge.loading import load

        if threads:
            torch.set_num_threads(threads)
        self.model, self._empty = load(path).model.eval(), DynamicCache
        self.logits = torch_logits(self.model)
        self.cache = DynamicCache()

    @torch.inference_mode()
    def eval(self, tokens: np.ndarray) -> None:
        out = self.model(input_ids=torch.from_numpy(tokens)[None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values

    def truncate(self, n: int) -> None:
        drop = self.cache.get_seq_length() - n
        if n == 0:
            self.cache = self._empty()
        elif drop > 0:
            self.cache.crop(-drop)  # transformers 5 crops by a negative count

    def close(self) -> None:
        self.model = self.cache = None


class LlamaCppSession:
    def __init__(self, path: str, n_ctx: int, threads: int | None = None, flash_attn: bool = True,
                 logits: bool = True, kv_type: str = "f16"):
        from transact_edge.llamacpp import open_gguf

        self.rt = open_gguf(Path(path), n_ctx=n_ctx, flash_attn=flash_attn, threads=threads, logits_all=logits,
                            kv_type=kv_type)
        self.kv = self.rt.kv_cache()
        self.logits = self.rt.batch_logits

    def eval(self, tokens: np.ndarray) -> None:
        self.rt.llm.eval(tokens.tolist())

    def truncate(self, n: int) -> None:
        self.rt.llm.n_tokens = n  # the next eval drops the cells from n on

    def close(self) -> None:
        self.rt.llm.close()


class OrtSession:
    kv = None

    def __init__(self, path: str, n_ctx: int, threads: int | None = None, **_):
        from transact_edge.ortruntime import OrtModel

        self.model = OrtModel(Path(path), threads)
        self.logits = self.model.logits
        self.past = self.model.empty_past(1)

    def eval(self, tokens: np.ndarray) -> None:
        _, self.past = self.model.forward(tokens[None], self.past)

    def truncate(self, n: int) -> None:
        self.past = {k: v[:, :, :n] for k, v in self.past.items()}

    def close(self) -> None:
        self.model = self.past = None


class GenaiSession:
    """onnxruntime-genai over an exported directory (genai_config.json beside the graph): the runtime
    that ships to phones. It hands out the last position's logits only, so it decodes but does not score."""
    kv = None

    def __init__(self, path: str, n_ctx: int, threads: int | None = None, **_):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise UserError("onnxruntime-genai is not installed (pip install onnxruntime-genai)") from None
        directory = Path(path) if Path(path).is_dir() else Path(path).parent
        config = og.Config(str(directory))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=n_ctx, do_sample=False)
        self.gen = og.Generator(self.model, params)

    def eval(self, tokens: np.ndarray) -> None:
        self.gen.append_tokens(tokens.astype(np.int32))

    def truncate(self, n: int) -> None:
        self.gen.rewind_to(n)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise UserError("onnxruntime-genai gives the last position's logits only; score with --runtime onnxruntime")

    def close(self) -> None:
        self.gen = self.model = None


RUNTIMES = {"torch": TorchSession, "llama.cpp": LlamaCppSession, "onnxruntime": OrtSession,
            "onnxruntime-genai": GenaiSession}
FILES = {"llama.cpp": "a GGUF file", "onnxruntime": "an ONNX file"}  # what each runtime opens, beside torch's checkpoints


def open_runtime(name: str, path: str | Path, n_ctx: int = 512, threads: int | None = None, **options):
    """A session of runtime `name` over `path`; options: flash_attn, kv_type, logits (llama.cpp)."""
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    if name in FILES and not Path(path).is_file():
        raise UserError(f"{name} needs {FILES[name]}; not found: {path}")
    return RUNTIMES[name](str(path), n_ctx, threads, **options)
