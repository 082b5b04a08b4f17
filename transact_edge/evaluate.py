"""Perplexity with a stated protocol.

Windows of `window` tokens start every `stride` tokens over the token stream of the held-out text;
the first window scores all its predictions, later ones only the tokens no earlier window scored
(the Hugging Face sliding-window recipe; stride == window means disjoint windows).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transact_edge.errors import UserError


@dataclass
class Perplexity:
    ppl: float
    nll: float        # mean negative log-likelihood per scored token, nats
    window: int
    stride: int
    tokens: int       # tokens scored
    text: str         # which text

    def protocol(self) -> str:
        return f"{self.text}, window {self.window}, stride {self.stride}, {self.tokens} tokens scored"

    def line(self) -> str:
        return f"perplexity {self.ppl:.3f} ({self.protocol()})"

    def as_dict(self) -> dict:
        return asdict(self)


def torch_logits(model):
    """A logits function over (B, T) token batches for a transformers model."""
    device = next(model.parameters()).device
    model.eval()
    return lambda x: model(input_ids=x.to(device), use_cache=False).logits


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 8, text: str = "held-out text") -> Perplexity:
    """`model`: a transformers model, or a function (B, T) ids -> (B, T, V) logits (onnxruntime, llama.cpp)."""
    stride = stride or window
    if not 0 < stride <= window:
        raise UserError(f"stride must be in (0, window={window}], got {stride}")
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < window:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {window}")
    starts = list(range(0, ids.numel() - window + 1, stride))
    inputs = torch.stack([ids[s:s + window] for s in starts])  # (n_windows, window)
    labels = inputs.clone()
    labels[1:, : window - stride] = -100  # already scored by the previous window
    logits_of = torch_logits(model) if isinstance(model, torch.nn.Module) else model
    nll, count = 0.0, 0
    for x, y in tqdm(list(zip(inputs.split(batch_size), labels.split(batch_size))), desc="perplexity", leave=False):
        logits = logits_of(x)[:, :-1].float()  # (B, T-1, V)
        target = y[:, 1:].to(logits.device)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    mean = nll / count
    return Perplexity(math.exp(mean), mean, window, stride, count, text)
