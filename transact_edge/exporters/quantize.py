"""llama.cpp's own quantizer for the types users ship: `export --outtype Q4_K_M`, `--outtype IQ3_XXS --imatrix auto`.

Every type is made by the built `llama-quantize` (`transact-edge build-llama`) from an F32 GGUF staged
beside the output, with llama-quantize's options as it has them: `--imatrix`, `--token-embedding-type`,
`--output-tensor-type`. The legacy types (Q8_0 ... Q4_0) go through it with `--pure` (every weight in
that type, as gguf-py writes them when no such option is given); the K- and i-quant names are
llama-quantize's mixes. What llama-quantize stores in another type because a row does not fill the
type's blocks (K- and i-quants need rows that are multiples of 256) is parsed from its log and reported.
Everything llama-quantize would abort on is refused first, in one line, before anything is written.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from transact_edge.errors import UserError

log = logging.getLogger(__name__)

FLOAT = ("f32", "f16", "bf16")
LEGACY = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# llama-quantize's ftype names (tools/quantize/quantize.cpp), lower-cased; aliases as it has them
MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
         "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
         "iq4_nl", "iq4_xs")
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
TYPES = (*FLOAT, *LEGACY, *MIXES)
# mixes whose tensors llama-quant.cpp quantizes to a type it refuses to make without an imatrix
# (tensor_requires_imatrix: IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS; IQ3_XS mixes in IQ3_XXS)
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs")
# ggml tensor types for --token-embedding-type / --output-tensor-type (ggml_type_name, any case); the
# i-quants that need importance weights are left out: llama.cpp has none for these tensors
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q2_k", "q3_k", "q4_k", "q5_k",
                "q6_k", "iq3_s", "iq4_nl", "iq4_xs")
_FALLBACK = re.compile(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                       r"(?: \(WARNING: must use F16 due to unusual shape\))? -> falling back to\s+(\S+)")


@dataclass(frozen=True)
class QuantizeOptions:
    """What llama-quantize is asked for (names lower-cased, checked by `check`)."""
    outtype: str
    imatrix: str | None = None               # a file llama-imatrix wrote (GGUF or .dat), or "auto"
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None

    @property
    def needs_llama_quantize(self) -> bool:
        """gguf-py writes the float and legacy types alone; everything else is llama-quantize's."""
        return (self.outtype in MIXES or self.imatrix is not None or self.token_embedding_type is not None
                or self.output_tensor_type is not None)


def canonical(outtype: str) -> str:
    """An --outtype in llama-quantize's spelling (any case) as this module names it; refused if unknown."""
    name = ALIASES.get(outtype.lower(), outtype.lower())
    if name not in TYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose from {', '.join(t.upper() for t in TYPES)} "
                        f"(any case; aliases {', '.join(a.upper() for a in ALIASES)})")
    return name


def check(opts: QuantizeOptions, row: int) -> None:
    """Refuse what llama-quantize would abort on or silently ignore; `row` is the embedding's row length."""
    import gguf

    if opts.imatrix is not None and opts.outtype in FLOAT:
        raise UserError(f"--imatrix with --outtype {opts.outtype}: a float type has nothing for an importance "
                        "matrix to weight")
    if opts.outtype in NEEDS_IMATRIX and opts.imatrix is None:
        raise UserError(f"--outtype {opts.outtype.upper()} needs an importance matrix (llama-quantize refuses "
                        "it without one): give --imatrix FILE or --imatrix auto")
    for flag, name in (("--token-embedding-type", opts.token_embedding_type),
                       ("--output-tensor-type", opts.output_tensor_type)):
        if name is None:
            continue
        if name not in TENSOR_TYPES:
            raise UserError(f"unknown {flag} {name!r}; choose from {', '.join(TENSOR_TYPES)}")
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]][0]
        if row % block:
            raise UserError(f"{flag} {name}: its blocks of {block} do not divide the model's rows of {row}")


def run(tool: Path, src: Path, dst: Path, opts: QuantizeOptions, imatrix: Path | None) -> list[tuple]:
    """Quantize `src` to `dst` with llama-quantize; returns the fallbacks it logged (see `fallbacks`)."""
    cmd = [str(tool)]
    if opts.outtype in LEGACY or opts.outtype in FLOAT:
        cmd.append("--pure")
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if opts.token_embedding_type:
        cmd += ["--token-embedding-type", opts.token_embedding_type]
    if opts.output_tensor_type:
        cmd += ["--output-tensor-type", opts.output_tensor_type]
    cmd += [str(src), str(dst), opts.outtype.upper(), str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    text = proc.stdout + proc.stderr
    if proc.returncode:
        lines = [l.strip() for l in text.splitlines() if "failed" in l or "error" in l.lower()]
        lines = lines or text.splitlines()[-1:]
        raise UserError(f"llama-quantize failed ({opts.outtype.upper()}): {lines[-1] if lines else proc.returncode}")
    found = fallbacks(text)
    report(found, opts.outtype)
    return found


def fallbacks(log_text: str) -> list[tuple[str, int, int, str, str]]:
    """(tensor, row length, block, wanted type, stored type) for each tensor llama-quantize fell back on."""
    return [(m[1], int(m[2]), int(m[3]), m[4], m[5]) for m in _FALLBACK.finditer(log_text)]


def report(found: list[tuple[str, int, int, str, str]], outtype: str) -> None:
    """One warning per (wanted, stored, row, block): which tensors, and why."""
    groups: dict[tuple, list[str]] = {}
    for name, row, block, wanted, got in found:
        groups.setdefault((wanted, got, row, block), []).append(name)
    for (wanted, got, row, block), names in groups.items():
        log.warning("%s: %d tensors stored as %s, not %s (rows of %d are not a multiple of its blocks of %d): %s",
                    outtype.upper(), len(names), got, wanted, row, block,
                    ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))


def tool() -> Path:
    """The built llama-quantize (native), or a one-line refusal naming the command that builds it."""
    from transact_edge import llamabuild

    found = llamabuild.find("native", "llama-quantize")
    if found is None:
        raise UserError("llama-quantize is not built: run transact-edge build-llama --target native")
    return found
