"""ONNX export with a per-layer KV cache: `transact-edge export DIR --format onnx`.

The graph takes input_ids, attention_mask, position_ids and past_key_values.{i}.key/.value
(BNSH: batch, that layer's KV heads, past length, head_dim) and returns logits and
present.{i}.key/.value, with dynamic batch and sequence axes — optimum's names, but shapes may
differ per layer, so optimum's ORTModelForCausalLM cannot drive it: transact_edge.ortruntime does.
Exported with torch.onnx.export(dynamo=True); int8 through onnxruntime.quantization.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from transact_edge.errors import UserError
from transact_edge.loading import load, resolve
from transact_edge.shapes import head_dim, layer_shapes

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
QUANTIZE = ("int8",)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a .data file beside the graph


@dataclass
class ONNXExportOptions:
    checkpoint: str
    outfile: Path | None = None      # default: {checkpoint}-{dtype}[-int8].onnx beside the checkpoint
    dtype: str = "fp32"
    quantize: str | None = None


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(n_layer) for k in ("key", "value")]


def output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{k}" for i in range(n_layer) for k in ("key", "value")]


class _WithExplicitCache(torch.nn.Module):
    """The causal LM with its KV cache as flat tensors in and out (what ONNX can carry)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for il in range(len(past) // 2):
            cache.update(past[2 * il], past[2 * il + 1], il)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _example(model, batch: int = 1, seq: int = 4, past: int = 3):
    shapes, hd = layer_shapes(model.config), head_dim(model.config)
    dtype = next(model.parameters()).dtype
    kv = tuple(torch.zeros(batch, s.n_kv_head, past, hd, dtype=dtype) for s in shapes for _ in range(2))
    ids = torch.zeros(batch, seq, dtype=torch.long)
    return (ids, torch.ones(batch, past + seq, dtype=torch.long), torch.arange(past, past + seq)[None], kv)


def default_outfile(checkpoint: Path, dtype: str, quantize: str | None) -> Path:
    return checkpoint.parent / f"{checkpoint.name}-{dtype}{'-' + quantize if quantize else ''}.onnx"


def _write(model, path: Path) -> None:
    """torch.onnx.export (dynamo) of `model` to `path` (plus `path`.data when large)."""
    n_layer = len(layer_shapes(model.config))
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past} for _ in range(2 * n_layer)))
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        torch.onnx.export(_WithExplicitCache(model), _example(model), str(path), dynamo=True,
                          dynamic_shapes=dynamic, input_names=input_names(n_layer),
                          output_names=output_names(n_layer), external_data=large, optimize=True)


def export(opts: ONNXExportOptions) -> Path:
    """Write the ONNX graph atomically: built in a temporary sibling directory, moved into place."""
    if opts.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {opts.dtype!r}; choose from {', '.join(DTYPES)}")
    if opts.quantize not in (None, *QUANTIZE):
        raise UserError(f"unknown --quantize {opts.quantize!r}; choose from {', '.join(QUANTIZE)}")
    if opts.quantize and opts.dtype != "fp32":
        raise UserError("--quantize int8 starts from --dtype fp32")
    directory = resolve(opts.checkpoint)
    if directory.is_file():
        raise UserError(f"{opts.checkpoint}: export takes a checkpoint directory, not a file")
    out = Path(opts.outfile) if opts.outfile else default_outfile(Path(opts.checkpoint), opts.dtype, opts.quantize)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output's parent directory does not exist")
    model = load(opts.checkpoint, dtype=DTYPES[opts.dtype]).model
    model.config._attn_implementation = "sdpa"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = tmp / out.name
        if opts.quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            fp32 = tmp / "fp32.onnx"
            _write(model, fp32)
            quantize_dynamic(fp32, staged, weight_type=QuantType.QInt8,
                             use_external_data_format=fp32.with_suffix(".onnx.data").exists())
            for f in tmp.glob("fp32.onnx*"):
                f.unlink()
        else:
            _write(model, staged)
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):  # data first, the graph last
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class ONNXVerification:
    agreement: object            # compare.Agreement on held-out text
    same_greedy: bool            # n greedy tokens identical to PyTorch's
    n_generated: int
    kind: str                    # fp32 | fp16 | int8
    passed: bool | None          # None: reported only

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "reported"}[self.passed]
        rule = "max |Δlogit| <= 1e-3 and identical greedy tokens" if self.kind == "fp32" else "reported only"
        return (f"verify onnx {self.kind}: {self.agreement.line(('torch', 'onnxruntime'))}; "
                f"{self.n_generated} greedy tokens {'identical' if self.same_greedy else 'DIFFER'} -> {verdict} ({rule})")


def _torch_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    ids, out = prompt[None], []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def verify(path: Path, model, tokenizer, kind: str, n_tokens: int = 256, n_generate: int = 32) -> ONNXVerification:
    """onnxruntime vs PyTorch: logits on held-out text and greedy continuation of its first 32 tokens."""
    from transact_edge import corpus
    from transact_edge.compare import agreement
    from transact_edge.ortruntime import OrtModel

    ids = corpus.stream(tokenizer, corpus.DEFAULT, "eval")[:n_tokens]
    ort = OrtModel(path)
    with torch.inference_mode():
        ref = model(input_ids=ids[None]).logits[0].float()
    a = agreement(ref, ort.logits(ids[None])[0], ids)
    prompt = ids[:32]
    same = _torch_greedy(model, prompt, n_generate) == list(ort.generate(prompt.tolist(), n_generate))
    passed = (a.max_abs_diff <= 1e-3 and same) if kind == "fp32" else None
    return ONNXVerification(a, same, n_generate, kind, passed)
