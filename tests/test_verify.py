"""export --verify with bounds measured on the model itself (issue 22): correct files pass for every type,
K-quants included; the planted faults of test_gguf plus two swapped heads and one corrupted tensor fail,
by at least 10 x the largest correct-file error, on every family of the test chain (test_chain.py)."""
import numpy as np
import pytest
import torch

from transact_edge.checkpoint import save
from transact_edge.exporters.gguf import GGUFExportOptions, export, verify
from transact_edge.exporters.gguf_reference import rotate_half_rows
from transact_edge.exporters.rounding import int8_blocks
from transact_edge.ggufmap import from_llama_cpp, to_llama_cpp

from helpers import LLAMA3, tiny_model

# rows that fill K-quants' super-blocks of 256 (q/k/v/o, gate/up take 256 columns, down 256 too)
K_SHAPES = dict(hidden_size=256, head_dim=32, num_attention_heads=8, num_key_value_heads=2, intermediate_size=256,
                num_hidden_layers=2)
HEAD = K_SHAPES["head_dim"]


def _biased(model, q_scale: float = 1.0, k_scale: float = 1.0):
    torch.manual_seed(0)
    with torch.no_grad():  # transformers initialises biases to zero: give them weight
        for layer in model.model.layers:
            for proj, s in ((layer.self_attn.q_proj, q_scale), (layer.self_attn.k_proj, k_scale),
                            (layer.self_attn.v_proj, 1.0)):
                proj.bias.copy_(s * torch.randn_like(proj.bias))
    return model


FAMILIES = {  # the test chain's families, each with the exporter faults that can happen to it
    "llama3 rope": (lambda: tiny_model("llama", rope_parameters=LLAMA3, **K_SHAPES),
                    ["q/k rows unpermuted", "norm epsilon wrong", "rope base wrong"]),
    "qwen2 biases gqa 4:1": (lambda: _biased(tiny_model("qwen2", tie_word_embeddings=True, **K_SHAPES)),
                             ["bias dropped", "norm epsilon wrong", "rope base wrong"]),
}
FILE_FAULTS = ["two heads swapped", "tensor corrupted"]


def _edit_tensor(path, name: str, fault: str) -> None:
    """A fault planted in the written file's bytes: rows of heads 0 and 1 swapped, or half a tensor zeroed."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    data = next(t for t in reader.tensors if t.name == name).data  # (rows, values or bytes per row)
    if fault == "two heads swapped":
        data[: 2 * HEAD] = np.concatenate([data[HEAD: 2 * HEAD], data[:HEAD]]).copy()
    else:
        data[data.shape[0] // 2:] = 0
    reader.data.flush()


def _scores(family: str, outtype: str, tmp_path, tokenizer, monkeypatch) -> dict:
    """Each file's verification score (its larger error in units of its bound), correct and faulty."""
    from test_gguf import _faulty

    build, faults = FAMILIES[family]
    model = build()
    save(tmp_path / "ckpt", model, tokenizer)
    results = {}
    for fault in [None, *faults, *FILE_FAULTS]:
        out = tmp_path / f"{fault or 'correct'}.gguf".replace(" ", "-").replace("/", "")
        with monkeypatch.context() as m:
            if fault in faults:
                _faulty(m, fault)
            export(GGUFExportOptions(str(tmp_path / "ckpt"), outtype, out))
        if fault in FILE_FAULTS:
            _edit_tensor(out, "blk.0.attn_q.weight" if fault == "two heads swapped" else "blk.1.ffn_down.weight", fault)
        results[fault] = verify(out, model, tokenizer, outtype, n_tokens=64)
    return results


# each family's faults once and each kind of bound once (float rounding; Q4_K/Q6_K rows with Q8_K activations):
# qwen2's large biases under the quantized bound, the hardest pair (its F16 file passes in the scale test below)
@pytest.mark.parametrize("family,outtype", [("llama3 rope", "f16"), ("qwen2 biases gqa 4:1", "q4_k_m")])
def test_correct_files_pass_and_every_fault_fails_by_10x(family, outtype, tmp_path, tokenizer, monkeypatch):
    results = _scores(family, outtype, tmp_path, tokenizer, monkeypatch)
    correct = results.pop(None)
    assert correct.passed, correct.line()
    assert "x the model's own float noise" in correct.rule and "float64" in correct.rule, correct.rule
    for fault, v in results.items():
        assert not v.passed, f"{fault}: {v.line()}"
        assert v.score >= 10 * correct.score, f"{fault}: {v.score:.3g} vs correct {correct.score:.3g}\n{v.line()}"


def test_k_quant_file_is_read_back_type_by_type(tmp_path, tokenizer):
    """A Q4_K_M file holds Q4_K and Q6_K rows: read back, each within its rounding, and the runtime's
    Q8_K activation rounding named in the bound."""
    import gguf

    model = tiny_model("llama", **K_SHAPES)
    save(tmp_path / "ckpt", model, tokenizer)
    out = export(GGUFExportOptions(str(tmp_path / "ckpt"), "q4_k_m", tmp_path / "m.gguf"))
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) > 1}
    assert {"Q4_K", "Q6_K"} <= types, types
    v = verify(out, model, tokenizer, "q4_k_m", n_tokens=64)
    assert v.passed and "Q8_K" in v.rule, v.line()
    assert 0 < v.weights.ratio <= 4, v.weights


def test_qwen2_scale_biases_pass(tmp_path, tokenizer, capsys):
    """Qwen2's scale (issue 22, where fixed bounds failed correct files): q/k biases in the tens to
    hundreds and a residual stream with two massive channels, as real Qwen2 checkpoints carry (scale
    only, not its weights). Correct F16, Q8_0 and Q4_K_M files pass with bounds measured on the model."""
    model = _biased(tiny_model("qwen2", **K_SHAPES), q_scale=8.0, k_scale=40.0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias[:4] = torch.tensor([150.0, -120.0, 90.0, -200.0])
        model.model.layers[0].mlp.down_proj.weight[:2] *= 300  # massive activations in two channels
    save(tmp_path / "ckpt", model, tokenizer)
    for outtype in ("f16", "q8_0", "q4_k_m"):
        out = export(GGUFExportOptions(str(tmp_path / "ckpt"), outtype, tmp_path / f"{outtype}.gguf"))
        v = verify(out, model, tokenizer, outtype, n_tokens=128)
        print(v.line())
        assert v.passed, v.line()


def test_rotate_half_map_is_the_inverse_of_the_exporters_permutation():
    """The read-back's own index map, checked against the exporter's reshape (never used by the check)."""
    w = np.arange(3 * 16 * 5, dtype=np.float32).reshape(3 * 16, 5)
    assert np.array_equal(to_llama_cpp(w, 3)[rotate_half_rows(3, 16)], w)
    assert np.array_equal(from_llama_cpp(to_llama_cpp(w, 3), 3), w)


def test_int8_block_rounding_is_q8_0():
    """The emulated activation rounding is ggml's Q8_0: gguf-py's quantize -> dequantize, value for value."""
    import gguf

    x = torch.randn(4, 64) * torch.logspace(-3, 3, 64)
    q8 = gguf.GGMLQuantizationType.Q8_0
    want = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), q8), q8)
    assert np.allclose(int8_blocks(32, f16_scale=True)(x).numpy(), want, rtol=0, atol=1e-6 * float(x.abs().max()))


def _swap_heads_onnx(graph, int4: bool) -> None:
    """Swap heads 0 and 1 of the first quantized matmul (int4) or of layer 0's q_proj (fp32) in place."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    inits = {i.name: i for i in model.graph.initializer}
    if int4:
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    else:
        node = next(n for n in model.graph.node if n.op_type == "MatMul" and any(
            p.value.endswith("layers.0.self_attn.q_proj', 'linear']") for p in n.metadata_props))
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    axis = 0 if int4 else 1                                         # MatMulNBits B: (N, ...); MatMul B: (K, N)
    idx = np.arange(w.shape[axis])
    idx[: 2 * HEAD] = np.r_[HEAD: 2 * HEAD, :HEAD]
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.take(w, idx, axis=axis), node.input[1]))
    onnx.save(model, str(graph))


@pytest.mark.parametrize("kind", ["fp32", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_correct_graph_passes_and_a_weight_fault_fails_by_10x(family, kind, tmp_path, tokenizer):
    from transact_edge.exporters.onnx import ONNXExportOptions
    from transact_edge.exporters.onnx import export as onnx_export
    from transact_edge.exporters.onnx import verify as onnx_verify

    model = FAMILIES[family][0]()
    save(tmp_path / "ckpt", model, tokenizer)
    graph = onnx_export(ONNXExportOptions(str(tmp_path / "ckpt"), quantize="int4" if kind == "int4" else None))
    correct = onnx_verify(graph, model, tokenizer, kind, n_tokens=64, n_generate=4)
    assert correct.passed, correct.line()
    _swap_heads_onnx(graph, kind == "int4")
    broken = onnx_verify(graph, model, tokenizer, kind, n_tokens=64, n_generate=4)
    assert not broken.passed and broken.score >= 10 * correct.score, (broken.line(), correct.line())
