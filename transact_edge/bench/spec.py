"""What to time, as llama-bench names it: -p prompt lengths, -n generation lengths, -d depths, -pg pairs."""
from __future__ import annotations

from dataclasses import dataclass, field

from transact_edge.errors import UserError


def int_list(text: str, what: str) -> list[int]:
    """'512' or '0,1024,4096' -> [ints >= 0]; anything else is a bad test spec."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise UserError(f"bad {what} {text!r}: expected comma-separated integers >= 0, e.g. 0,4096")
    return values


def pair(text: str) -> tuple[int, int]:
    """'256,64' -> (256, 64): a prompt-then-generate test (llama-bench's -pg)."""
    values = int_list(text, "-pg")
    if len(values) != 2 or 0 in values:
        raise UserError(f"bad -pg {text!r}: expected PROMPT,GEN with both > 0, e.g. 256,64")
    return values[0], values[1]


@dataclass(frozen=True)
class Tests:
    n_prompt: list[int]
    n_gen: list[int]
    depths: list[int]
    pg: list[tuple[int, int]] = field(default_factory=list)

    def cases(self) -> list[tuple[int, int, int]]:
        """(prompt, gen, depth) like llama-bench: pp tests, tg tests, then pp+tg tests, per depth."""
        out = [(p, 0, d) for d in self.depths for p in self.n_prompt if p > 0]
        out += [(0, n, d) for d in self.depths for n in self.n_gen if n > 0]
        out += [(p, n, d) for d in self.depths for p, n in self.pg]
        if not out:
            raise UserError("no test to run: -p and -n are both 0")
        return sorted(out, key=lambda c: c[2])

    def max_ctx(self) -> int:
        return max(p + n + d for p, n, d in self.cases())


def test_name(p: int, n: int, d: int) -> str:
    return ("+".join(([f"pp{p}"] if p else []) + ([f"tg{n}"] if n else []))) + (f" @ d{d}" if d else "")
