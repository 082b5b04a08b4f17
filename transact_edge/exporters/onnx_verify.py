"""`export --verify` for ONNX: onnxruntime against PyTorch, with bounds measured on the model itself.

fp32: the graph against the model in float64 (where it fits); the bound is NOISE_MULTIPLE x the model's
own float noise on the same tokens (float32 PyTorch vs float64, rounding.py). int4: every MatMulNBits
initializer is dequantized by code of its own ((q - zero point) x scale per block of `block_size` along
K; zero point 2^(bits-1) when absent), matched to the model's Linear of that shape whose weights it is
closest to, and checked row by row: each row within WEIGHT_MULTIPLE x the error of symmetric
round-to-nearest at the same bits and block size on the model's own row. The model carrying those
weights is then the reference, with the same noise rule (activations rounded to int8 blocks where the
node asks for accuracy_level 4, as onnxruntime's CPU kernel then does; float32 otherwise). A graph
from our own fp32 export quantized by onnxruntime: matching by values cannot tell two whole same-shape
matrices apart, which the fp32 check of the same export covers. In both, the graph's greedy
continuation (through its KV cache) must be what the reference picks at every step, up to the bound.
fp16 and int8 are reported only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transact_edge.exporters.gguf_reference import WEIGHT_MULTIPLE, TensorCheck
from transact_edge.exporters.rounding import Noise, float_noise, int8_blocks, rtn_error

CHECKED = ("fp32", "int4")


@dataclass
class ONNXVerification:
    agreement: object            # compare.Agreement on held-out text
    same_greedy: bool            # every greedy token is the reference's pick, up to the bound
    n_generated: int
    kind: str                    # fp32 | fp16 | int8 | int4
    passed: bool | None          # None: reported only
    rule: str = "reported only"
    weights: TensorCheck | None = None   # int4: the weight farthest from the model's, in units of its rounding
    score: float = 0.0           # the larger error in units of its bound (<= 1 passes)

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "reported"}[self.passed]
        return (f"verify onnx {self.kind}: {self.agreement.line(('torch', 'onnxruntime'))}; "
                f"{self.n_generated} greedy tokens {'consistent' if self.same_greedy else 'DIFFER'} -> {verdict} ({self.rule})")


def _array(init, directory: Path) -> np.ndarray:
    from onnx.numpy_helper import to_array

    return to_array(init, str(directory))


def dequantized(graph: Path) -> list[tuple[np.ndarray, int, int]]:
    """(weight (N, K) float32, block size, accuracy level) of every MatMulNBits node of the graph."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        n, k, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
        get = lambda i: _array(inits[node.input[i]], graph.parent) if len(node.input) > i and node.input[i] else None  # noqa: E731
        packed = get(1).reshape(n, -1).astype(np.uint8)                            # (N, blocks * block * bits / 8)
        q = np.stack([packed >> s & (2**bits - 1) for s in range(0, 8, bits)], -1).reshape(n, -1, block)
        blocks = q.shape[1]
        scales = get(2).reshape(n, blocks, 1).astype(np.float32)
        zp = get(3)
        if zp is None:
            zero = np.full((n, blocks, 1), 2 ** (bits - 1), np.float32)
        elif zp.dtype == np.uint8:                                                 # packed like the weights
            zero = np.stack([zp.reshape(n, -1) >> s & (2**bits - 1) for s in range(0, 8, bits)], -1)
            zero = zero.reshape(n, -1)[:, :blocks, None].astype(np.float32)
        else:
            zero = zp.reshape(n, blocks, 1).astype(np.float32)
        w = ((q.astype(np.float32) - zero) * scales).reshape(n, -1)[:, :k]
        out.append((w, block, a.get("accuracy_level", 0)))
    return out


def read_back_int4(model, graph: Path):
    """(float32 copy of `model` carrying the graph's dequantized weights, worst TensorCheck, rounding)."""
    ref = copy.deepcopy(model).float().eval()
    linears = {name: m for name, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    taken, checks, rounding = set(), [], {}
    for w, block, level in dequantized(graph):
        same = [n for n, m in linears.items() if tuple(m.weight.shape) == w.shape and n not in taken]
        if not same:
            checks.append(TensorCheck(f"MatMulNBits {w.shape}", float("inf"), "matches no Linear of the model"))
            continue
        rows = min(8, w.shape[0])
        name = min(same, key=lambda n: float(np.linalg.norm(linears[n].weight.detach().numpy()[:rows] - w[:rows])))
        own = linears[name].weight.detach().numpy()
        err = np.linalg.norm(w - own, axis=-1)
        checks.append(TensorCheck(name + ".weight", float((err / (rtn_error(own, 4, block) + 1e-12)).max())))
        taken.add(name)
        with torch.no_grad():
            linears[name].weight.copy_(torch.from_numpy(w))
        rounding[name] = ((int8_blocks(block, f16_scale=False), f"int8/{block}") if level == 4 else (None, "F32"))
    if not checks:
        checks.append(TensorCheck("MatMulNBits", float("inf"), "no MatMulNBits node in the graph"))
    return ref, max(checks, key=lambda c: c.ratio), rounding


def _greedy_consistent(reference, prompt: torch.Tensor, tokens: list[int], bound: float) -> bool:
    """Each token the graph picked is the reference's best next token, or within `bound` of it."""
    seq = torch.cat([prompt, torch.tensor(tokens, dtype=prompt.dtype)])
    with torch.inference_mode():
        logits = reference(input_ids=seq[None]).logits[0, len(prompt) - 1:-1].double()   # (n, V)
    gap = logits.max(-1).values - logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return bool((gap <= bound).all())


def verify(path: Path, model, tokenizer, kind: str, n_tokens: int = 256, n_generate: int = 32) -> ONNXVerification:
    """onnxruntime vs PyTorch: logits on held-out text and greedy continuation of its first 32 tokens."""
    from transact_edge import corpus
    from transact_edge.compare import agreement
    from transact_edge.runtimes import open_runtime

    ids = corpus.stream(tokenizer, corpus.DEFAULT, "eval")[:n_tokens]
    weights, rounding = None, {}
    if kind == "int4":
        reference, weights, rounding = read_back_int4(model, path)
    else:
        reference = copy.deepcopy(model).float().eval() if kind == "fp32" else model
    if kind in CHECKED:
        noise = float_noise(reference, ids, rounding)
    else:  # reported against the model as it is, no bound
        with torch.inference_mode():
            noise = Noise(0.0, model(input_ids=ids[None]).logits[0].double(), "")
    session = open_runtime("onnxruntime", path, n_ctx=n_tokens)
    a = agreement(noise.exact, session.logits(ids[None])[0], ids)
    prompt = ids[:32]
    generated = list(session.model.generate(prompt.tolist(), n_generate))
    same = _greedy_consistent(reference, prompt, generated, noise.bound)
    if kind not in CHECKED:
        return ONNXVerification(a, same, n_generate, kind, None)
    w_ratio = weights.ratio if weights else 0.0
    score = max(a.max_abs_diff / max(noise.bound, 1e-30), w_ratio / WEIGHT_MULTIPLE)
    rule = noise.rule() + ("; greedy picks within the bound" if kind == "fp32" else "")
    if weights:
        rule += (f"; weights: {weights.name} {weights.note or f'{weights.ratio:.3g} x 4-bit round-to-nearest'}"
                 f" (worst; <= {WEIGHT_MULTIPLE:g}); greedy picks within the bound")
    return ONNXVerification(a, same, n_generate, kind, score <= 1 and same, rule, weights, score)
