"""Agreement of two runtimes' logits on the same tokens: the numbers every --verify prints."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class Agreement:
    tokens: int
    max_abs_diff: float      # max |logit difference|
    top1: float              # share of positions where both pick the same next token
    kl: float                # mean KL(reference || other) per position, nats
    ppl_reference: float     # perplexity of the text's next tokens under each
    ppl_other: float

    @property
    def ppl_drift(self) -> float:
        return self.ppl_other / self.ppl_reference - 1.0

    def as_dict(self) -> dict:
        return asdict(self) | {"ppl_drift": self.ppl_drift}

    def line(self, names: tuple[str, str]) -> str:
        return (f"{self.tokens} tokens: max |Δlogit| {self.max_abs_diff:.4f}, top-1 agreement {100 * self.top1:.2f}%, "
                f"KL {self.kl:.5f}, perplexity {names[0]} {self.ppl_reference:.3f} vs {names[1]} {self.ppl_other:.3f} "
                f"({100 * self.ppl_drift:+.2f}%)")


def agreement(reference: torch.Tensor, other: torch.Tensor, tokens: torch.Tensor) -> Agreement:
    """reference, other: (T, V) logits for `tokens` (T,); perplexity scores tokens[1:]."""
    reference, other = reference.double(), other.double()
    lp_ref, lp_oth = F.log_softmax(reference, -1), F.log_softmax(other, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_oth)).sum(-1).mean()
    nxt = tokens[1:, None]
    nll_ref = -lp_ref[:-1].gather(1, nxt).mean()
    nll_oth = -lp_oth[:-1].gather(1, nxt).mean()
    return Agreement(
        tokens=int(tokens.numel()),
        max_abs_diff=float((reference - other).abs().max()),
        top1=float((reference.argmax(-1) == other.argmax(-1)).double().mean()),
        kl=float(kl),
        ppl_reference=float(nll_ref.exp()),
        ppl_other=float(nll_oth.exp()),
    )
