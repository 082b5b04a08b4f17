"""Rope scaling through GGUF: llama3 (rope_freqs.weight), linear and yarn (metadata), exact in llama.cpp
and back into transformers; what llama.cpp cannot run is refused."""
import numpy as np
import pytest
import torch
import transformers

from transact_edge import corpus
from transact_edge.checkpoint import save
from transact_edge.cli import main
from transact_edge.errors import UserError
from transact_edge.exporters.gguf import GGUFExportOptions, export, verify
from transact_edge.ggufmap import read_kv
from transact_edge.ggufrope import from_gguf, llama3_divisors
from transact_edge.loading import load

from helpers import LLAMA3, tiny_model

LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32 = LLAMA31 | {"factor": 32.0}


@pytest.mark.parametrize("params,head_dim", [(LLAMA31, 128), (LLAMA32, 64), (LLAMA3, 16),
                                             (LLAMA3 | {"low_freq_factor": 2.0, "high_freq_factor": 8.0}, 16)])
def test_llama3_divisors_are_transformers_frequency_ratios(params, head_dim):
    cfg = transformers.LlamaConfig(hidden_size=8 * head_dim, num_attention_heads=8, head_dim=head_dim,
                                   max_position_embeddings=131072, rope_parameters=params)
    scaled = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).inv_freq
    plain = 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    divisors = llama3_divisors(params, head_dim)
    np.testing.assert_allclose(divisors, (plain / scaled).numpy(), rtol=1e-5)
    assert divisors.min() == 1.0 and divisors.max() == params["factor"]  # both ends reached


@pytest.mark.parametrize("params,head_dim", [(LLAMA31, 128), (LLAMA32, 64), (LLAMA3, 16)])
def test_llama3_parameters_fitted_from_rope_freqs_alone(params, head_dim):
    """A GGUF from llama.cpp's converter has the tensor and no parameters: they are fitted back."""
    freqs = llama3_divisors(params, head_dim)
    assert from_gguf({"llama.rope.freq_base": params["rope_theta"]}, "llama", freqs) == params
    with pytest.raises(UserError, match="does not follow llama3"):
        from_gguf({"llama.rope.freq_base": params["rope_theta"]}, "llama", freqs[::-1].copy())
    ours = {f"transact.rope.llama3.{k}": v for k, v in (("factor", 2.0), ("low_freq_factor", 1.0),
                                                        ("high_freq_factor", 4.0), ("original_context_length", 64))}
    with pytest.raises(UserError, match="does not follow llama3"):  # parameters and tensor disagree
        from_gguf({"llama.rope.freq_base": params["rope_theta"], **ours}, "llama", freqs)
    assert from_gguf({"llama.rope.freq_base": 1e4}, "llama", np.ones(8, np.float32))["rope_type"] == "default"


CASES = {  # family, rope_parameters, the llama.cpp graph it becomes
    "llama llama3": ("llama", LLAMA3, "llama"),
    "qwen2 llama3, tensor only": ("qwen2", LLAMA3, "deci"),  # llama.cpp's qwen2 graph loads no rope_freqs
    "llama linear": ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, "llama"),
    "qwen2 yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 128, "attention_factor": 1.5}, "qwen2"),
}


@pytest.mark.parametrize("case", CASES)
def test_scaled_rope_exact_in_llama_cpp_and_read_back(case, tmp_path, tokenizer, monkeypatch):
    """llama.cpp runs the file exactly; the rope parameters come back from it. The llama3 files are loaded
    whole, through transformers' GGUF loader (llama) and ours (deci): same logits as the source. The
    "tensor only" file lacks our transact.rope.llama3.* keys, as llama.cpp's converter writes it."""
    from transact_edge.exporters import gguf as exporter

    family, rope, arch = CASES[case]
    model = tiny_model(family, rope_parameters=rope)
    save(tmp_path / "ckpt", model, tokenizer)
    if "tensor only" in case:
        monkeypatch.setattr(exporter, "add_keys", lambda writer, params: None)
    out = export(GGUFExportOptions(str(tmp_path / "ckpt"), "f32", tmp_path / "m.gguf"))
    v = verify(out, model, tokenizer, "f32", n_tokens=128)
    assert v.passed, v.line()
    meta = {k: v for k, v, *_ in read_kv(out)}
    assert meta["general.architecture"] == arch
    assert ("transact.rope.llama3.factor" in meta) == (rope["rope_type"] == "llama3" and "tensor only" not in case)
    ids = corpus.stream(tokenizer, "wiki", "eval")[:128][None]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = tiny_model(family)(input_ids=ids).logits  # same weights, unscaled rope: the scaling matters
    assert (plain - want).abs().max() > 100 * v.exact.max_abs_diff + 1e-2
    if rope["rope_type"] != "llama3":
        assert from_gguf(meta, arch, None) == pytest.approx(rope)
        return
    back = load(str(out)).model
    assert back.config.rope_parameters == rope
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fault,per_layer", [("divisors all 1", False), ("scaled pairs divided by 2 x factor", True)])
def test_wrong_rope_freqs_fail_the_exactness_check(fault, per_layer, tmp_path, tokenizer, monkeypatch):
    """A Llama-3-style model (llama graph, or deci when widths differ per layer) exported with a planted
    rope_freqs fault: the exactness check fails."""
    from test_surgery import plans_for

    from transact_edge.exporters import gguf as exporter
    from transact_edge.shapes import LayerShape
    from transact_edge.surgery import cut

    model = tiny_model("llama", rope_parameters=LLAMA3)
    if per_layer:
        model = cut(model, plans_for(model, [LayerShape(6, 2, 128), LayerShape(3, 1, 64), LayerShape(6, 2, 96)]))
    save(tmp_path / "ckpt", model, tokenizer)
    right = exporter.rope_freqs
    wrong = {"divisors all 1": lambda c, hd: np.ones_like(right(c, hd)),
             "scaled pairs divided by 2 x factor": lambda c, hd: np.where(right(c, hd) > 1, 2 * right(c, hd), 1)}[fault]
    monkeypatch.setattr(exporter, "rope_freqs", lambda c, hd: wrong(c, hd).astype(np.float32))
    out = export(GGUFExportOptions(str(tmp_path / "ckpt"), "f32", tmp_path / "m.gguf"))
    assert read_kv(out, "general.architecture")[0][1] == ("deci" if per_layer else "llama")
    v = verify(out, model, tokenizer, "f32", n_tokens=128)
    assert v.passed is False and v.exact.max_abs_diff > 10 * float(v.rule.split("<= ")[1].split(" ")[0]), v.line()


@pytest.mark.parametrize("rope,needle", [
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "rope scaling 'dynamic'"),
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128,
      "beta_fast": 16.0}, "beta_fast/beta_slow"),
])
def test_rope_scaling_llama_cpp_cannot_run_is_refused(rope, needle, tmp_path, tokenizer, capsys):
    save(tmp_path / "ckpt", tiny_model("llama", rope_parameters=rope), tokenizer)
    capsys.readouterr()  # save's progress bar
    rc = main(["export", str(tmp_path / "ckpt"), "--outfile", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
