"""`export --imatrix auto`: an importance matrix for llama-quantize computed in PyTorch.

What llama-imatrix collects from every matrix product with a `blk.*` weight (tools/imatrix/imatrix.cpp,
collect_imatrix), made in one pass of the model being exported over the shipped calibration text,
with hooks on the inputs of q/k/v (one input), o, gate/up (one input) and down, and written as
llama-imatrix writes it (importance.py: the file format). Like llama-imatrix, it reads chunks of
CHUNK tokens and puts BOS first in each when the model's tokenizer adds one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from transact_edge import corpus
from transact_edge.calibration import accumulator
from transact_edge.ggufmap import read_header
from transact_edge.importance import WEIGHTS, write

CHUNK = 512        # llama-imatrix's default context
AUTO_CHUNKS = 64   # 32K tokens of the shipped calibration pages
SHARED_INPUT = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}


@torch.inference_mode()
def collect(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[dict[str, torch.Tensor], int]:
    """Sums of squared inputs (float64) of every `blk.*` weight over `windows` (N, T); and the token count."""
    sums, handles = {}, []
    for il, layer in enumerate(model.model.layers):
        shared: dict[str, torch.Tensor] = {}  # q/k/v and gate/up see one input: hook it once
        for name, (path, _) in WEIGHTS.items():
            module = layer.get_submodule(path)
            key = SHARED_INPUT.get(name, name)
            if key not in shared:
                shared[key] = torch.zeros(module.in_features, dtype=torch.float64)
                handles.append(module.register_forward_pre_hook(accumulator(shared[key])))
            sums[f"blk.{il}.{name}.weight"] = shared[key]
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            model.model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums, int(windows.numel())


def calibration_windows(tokenizer, bos: int | None, n: int = AUTO_CHUNKS, chunk: int = CHUNK) -> torch.Tensor:
    """The first `n` chunks of the shipped calibration pages, BOS first in each when the model adds one."""
    windows = corpus.windows(corpus.stream(tokenizer, corpus.DEFAULT, "train"), chunk, n).clone()
    if bos is not None:
        windows[:, 0] = bos
    return windows


def add_bos(gguf_path: Path) -> int | None:
    """The BOS id llama.cpp puts first in each chunk of this GGUF, or None when its tokenizer adds none."""
    meta = {k: v for k, v, *_ in read_header(gguf_path)[0]}
    return meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None


def auto(checkpoint: str, staged: Path, out: Path, chunks: int = AUTO_CHUNKS) -> None:
    """`--imatrix auto`: one calibration pass of the checkpoint in PyTorch (BOS as the `staged` GGUF adds it),
    written to `out`."""
    from transact_edge.loading import load

    loaded = load(checkpoint)
    model = loaded.model.float()
    windows = calibration_windows(loaded.tokenizer, add_bos(staged), chunks)
    sums, tokens = collect(model, windows)
    write(out, sums, tokens, CHUNK, [f"transact-edge auto: {corpus.DEFAULT} train pages, "
                                     f"{windows.shape[0]} x {CHUNK} tokens"])
