"""Why Q4_1 / Q5_1 score worse than Q4_0 / Q5_0 in the frontier (benchmarks/frontier.py).

Every SmolLM2 weight we start from is a dequantized Q4_1 value (the embedded package ships a Q4_1
GGUF): each block of 32 holds at most 16 values m + q·d. This script scores one model at every legacy
type with llama.cpp (llama-quantize from our F16 export, then llama-perplexity), and measures what each
type does to the weights with gguf-py's quantizers (checked byte-identical to llama-quantize's files):

- `rel_err`: ||deq(Q(W)) − W|| / ||W|| over the blocks' 2-D weights;
- with `--prune` or `--before` (a recovered point and the same cut unrecovered, W0): `kept` = the share of the
  recovery update W − W0 the quantized model keeps, <deq Q(W) − deq Q(W0), W − W0> / ||W − W0||²
  (1: all of it; 0: quantizing rounded it away), per tensor class;
- with either, `revert_only` / `q4_1_without_revert`: Q4_1's weight error split in two (`revert_split`)
  and each part scored alone;
- `q4_1_via_f16`: the Q4_1 file dequantized back to F16 by llama-quantize and scored with F16 kernels, to
  tell a weight effect from one of the q4_1 × q8_1 dot product.

    python benchmarks/quant_types.py --chunks 16                         # dense (this CPU)
    python3 benchmarks/quant_types.py --prune tx50-kd --tools /root/tools  # on a lent GPU host
    python benchmarks/quant_types.py --source RECOVERED_DIR --before UNRECOVERED_DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402
from _common import machine  # noqa: E402

LEGACY = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
CLASSES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def llama_quantize(src: Path, dst: Path, qtype: str, *extra: str) -> Path:
    subprocess.run([str(frontier.tool("llama-quantize")), *extra, str(src), str(dst), qtype.upper()],
                   capture_output=True, check=True)
    return dst


def weights(path: Path) -> dict[str, np.ndarray]:
    """The blocks' 2-D weights of a GGUF, dequantized to float32, by name."""
    import gguf

    return {t.name: gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(
                [int(n) for n in reversed(t.shape)]).astype(np.float32)
            for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds (token_embd separately: llama-quantize treats it apart)."""
    import gguf

    count: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        key = f"{t.name}:{t.tensor_type.name}" if not t.name.startswith("blk.") else t.tensor_type.name
        count[key] = count.get(key, 0) + 1
    return count


def roundtrip(w: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    q = gguf.GGMLQuantizationType[qtype.upper()]
    return gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)


def kept(qx: np.ndarray, qx0: np.ndarray, delta: np.ndarray) -> tuple[float, float]:
    """<deq Q(W) - deq Q(W0), W - W0> and ||W - W0||^2: their ratio is the share of the update kept."""
    return float(((qx - qx0) * delta).sum()), float((delta ** 2).sum())


def write_f16(f16: Path, dst: Path, change) -> Path:
    """A copy of the F16 GGUF with each block weight replaced by change(name, weight), token_embd through
    Q8_0 as in the llama-quantize files: a model scored with F16 kernels."""
    import gguf

    shutil.copyfile(f16, dst)
    reader = gguf.GGUFReader(dst, "r+")
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2 or t.name == "token_embd.weight":
            x = np.array(t.data, dtype=np.float32)
            t.data[...] = change(t.name, x) if t.name.startswith("blk.") else roundtrip(x, "q8_0")
    reader.data.flush()
    return dst


def revert_split(f16: Path, w0: dict[str, np.ndarray], work: Path) -> tuple[Path, Path]:
    """Q4_1's error split per tensor into its part along the recovery update, -(1 - kept)·(W - W0), and the
    rest: the recovered F16 model with only the first part added, and the Q4_1 model with it taken out."""
    def share(name: str, x: np.ndarray) -> float:
        num, den = kept(roundtrip(x, "q4_1"), roundtrip(w0[name], "q4_1"), x - w0[name])
        return 1 - num / den if den else 0.0

    revert = write_f16(f16, work / "revert-only.gguf", lambda n, x: x - share(n, x) * (x - w0[n]))
    rest = write_f16(f16, work / "q4_1-without-revert.gguf",
                     lambda n, x: roundtrip(x, "q4_1") + share(n, x) * (x - w0[n]))
    return revert, rest


def same_bytes(f16: dict[str, np.ndarray], quantized: Path, qtype: str) -> bool:
    """gguf-py's quantizer (our exporter's --outtype) writes the very bytes llama-quantize wrote."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype.upper()]
    return all(np.array_equal(gguf.quants.quantize(f16[t.name], q), np.array(t.data))
               for t in gguf.GGUFReader(quantized).tensors if t.name in f16)


def weight_effects(w: dict[str, np.ndarray], w0: dict[str, np.ndarray] | None, qtype: str) -> dict:
    """Relative weight error of the type, and (given the unrecovered weights) the recovery update it keeps."""
    err = norm = 0.0
    share = {c: [0.0, 0.0] for c in CLASSES}
    for name, x in w.items():
        qx = roundtrip(x, qtype)
        err += float(((qx - x) ** 2).sum())
        norm += float((x ** 2).sum())
        if w0 is not None:
            cls = name.split(".")[2]
            share[cls] = [s + t for s, t in zip(share[cls], kept(qx, roundtrip(w0[name], qtype), x - w0[name]))]
    out = {"rel_err": (err / norm) ** 0.5}
    if w0 is not None:
        out["kept"] = {c: a / b for c, (a, b) in share.items() if b}
        out["kept_all"] = sum(a for a, _ in share.values()) / sum(b for _, b in share.values())
    return out


def on_grid(w: dict[str, np.ndarray]) -> float:
    """Share of weights a Q4_1 round trip leaves unchanged (to F16 precision): 1 for dequantized Q4_1."""
    hit = total = 0
    for x in w.values():
        hit += int(np.isclose(roundtrip(x, "q4_1"), x, rtol=2e-3, atol=1e-6).sum())
        total += x.size
    return hit / total


def by_level(w: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """For weights on Q4_1 grids: the share of weights on each level q = 0..15, and the RMS error of Q5_0 and
    Q5_1 at each level in units of the source step d (Q5_1's step is 15 d / 31: its error depends on q)."""
    count, sq = np.zeros(16), {t: np.zeros(16) for t in ("q5_0", "q5_1")}
    for x in w.values():
        blocks = x.reshape(-1, 32)
        lo, hi = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
        d = np.where(hi > lo, (hi - lo) / 15, 1)
        level = np.clip(np.round((blocks - lo) / d), 0, 15).astype(int)
        count += np.bincount(level.ravel(), minlength=16)
        for t in sq:
            err = (roundtrip(x, t).reshape(blocks.shape) - blocks) / d
            sq[t] += np.bincount(level.ravel(), weights=(err ** 2).ravel(), minlength=16)
    return {"share": list(count / count.sum()), **{t: list(np.sqrt(v / count)) for t, v in sq.items()},
            **{f"{t}_all": float(np.sqrt(v.sum() / count.sum())) for t, v in sq.items()}}


def pruned_pair(name: str, work: Path, model: str) -> tuple[Path, Path]:
    """The frontier point `name` recovered, and the very same cut (its plan replayed) with no recovery."""
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions, prune

    spec = frontier.POINTS[name]
    common = dict(model=model, seed=0, force=True, **frontier.CALIB)
    before = work / f"{name}-before"
    prune(PruneOptions(out=before, train_tokens=0, widths=WidthRequest(**frontier.WIDTHS[spec["widths"]]), **common))
    after = work / name
    prune(PruneOptions(out=after, train_tokens=spec["train_tokens"], recovery=spec["recovery"], lr=spec["lr"],
                       train_data=spec.get("train_data"), gen_tokens=spec.get("gen_tokens", 0),
                       plan=str(before / "transact.json"), val_every=50, **common))
    return after, before


def score(path: Path, text: Path, a) -> float:
    return frontier.perplexity(path, text, types.SimpleNamespace(chunks=a.chunks, threads=a.threads))


def isolate(f16: Path, text: Path, a) -> dict[str, float]:
    """Q4_0 everywhere but one tensor class at Q4_1: which class carries the loss."""
    out = {}
    for cls in CLASSES:
        mixed = llama_quantize(f16, f16.with_name(f"mixed-{cls}.gguf"), "q4_0", "--tensor-type", f"{cls}=q4_1")
        out[cls] = score(mixed, text, a)
        mixed.unlink()
    return out


def run(a, work: Path) -> dict:
    from transact_edge.exporters.gguf import GGUFExportOptions, export

    source, before = pruned_pair(a.prune, work, a.source) if a.prune else (a.source, a.before)
    f16 = export(GGUFExportOptions(str(source), "f16", work / "model-f16.gguf"))
    text = frontier.texts(types.SimpleNamespace(second_text=None))["wiki"]
    w = weights(f16)
    w0 = weights(export(GGUFExportOptions(str(before), "f16", work / "before-f16.gguf"))) if before else None
    rec: dict = {"source": a.prune or str(a.source), "chunks": a.chunks, "on_q4_1_grid": on_grid(w),
                 "ppl": {"f16": score(f16, text, a)}, "types": {}}
    if rec["on_q4_1_grid"] > 0.99:
        rec["error_by_q4_1_level"] = by_level(w)
    if w0 is not None:
        rec["ppl"]["f16_unrecovered"] = score(work / "before-f16.gguf", text, a)
        rec["on_q4_1_grid_unrecovered"] = on_grid(w0)
    for qtype in LEGACY:
        path = llama_quantize(f16, work / f"model-{qtype}.gguf", qtype)
        rec["ppl"][qtype] = score(path, text, a)
        rec["types"][qtype] = tensor_types(path)
        rec[qtype] = weight_effects(w, w0, qtype) | {"gguf_py_same_bytes": same_bytes(w, path, qtype)}
        print(qtype, rec["ppl"][qtype], json.dumps(rec[qtype]), flush=True)
    back = llama_quantize(work / "model-q4_1.gguf", work / "q4_1-as-f16.gguf", "f16", "--allow-requantize")
    rec["ppl"]["q4_1_via_f16"] = score(back, text, a)
    if w0 is not None:
        revert, rest = revert_split(f16, w0, work)
        rec["ppl"] |= {"revert_only": score(revert, text, a), "q4_1_without_revert": score(rest, text, a)}
    if a.isolate:
        rec["q4_0_with_one_class_q4_1"] = isolate(f16, text, a)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="smollm2-135m", help="checkpoint directory or embedded model")
    p.add_argument("--before", help="with --source a recovered checkpoint: the same cut unrecovered")
    p.add_argument("--prune", help="a frontier point (e.g. tx50-kd): prune it, and the same cut unrecovered")
    p.add_argument("--tools", help="directory of llama-quantize and llama-perplexity (default: built ones)")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isolate", action="store_true", help="also Q4_0 with one tensor class at Q4_1")
    p.add_argument("--results", type=Path, default=frontier.RESULTS / "quant_types.jsonl")
    a = p.parse_args()
    frontier.TOOLS_DIR = Path(a.tools) if a.tools else None
    with tempfile.TemporaryDirectory(prefix="quant-types-") as work:
        rec = run(a, Path(work)) | {"machine": machine()}
    with a.results.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec["ppl"]))


if __name__ == "__main__":
    main()
