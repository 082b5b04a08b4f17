"""GGUF export: stock llama.cpp (llama-cpp-python) loads it and agrees with PyTorch."""
import json

import gguf
import pytest
import torch

from transact_edge import corpus, plan
from transact_edge.calibration import collect
from transact_edge.checkpoint import save
from transact_edge.cli import main
from transact_edge.exporters.gguf import GGUFExportOptions, export, verify
from transact_edge.llamacpp import open_gguf
from transact_edge.loading import load
from transact_edge.salience import from_stats
from transact_edge.shapes import LayerShape, head_dim, layer_shapes
from transact_edge.surgery import cut

from helpers import TINY, tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("kind,outtype", [("uniform", "q8_0"), ("per_layer", "f32"), ("per_layer", "q8_0")])
def test_real_pruned_export_runs_in_llama_cpp(pruned_dirs, tmp_path, kind, outtype):
    src = pruned_dirs[kind]
    out = export(GGUFExportOptions(str(src), outtype, tmp_path / "m.gguf"))
    loaded = load(str(src))
    result = verify(out, loaded.model, loaded.tokenizer, outtype, n_tokens=256)
    assert result.passed, result.line()
    reader = gguf.GGUFReader(out)
    arch = reader.get_field("general.architecture").contents()
    assert arch == ("llama" if kind == "uniform" else "deci")
    shapes = layer_shapes(loaded.model.config)
    for field, key in (("n_head", "attention.head_count"), ("n_kv_head", "attention.head_count_kv"),
                       ("ffn_dim", "feed_forward_length")):
        got = reader.get_field(f"{arch}.{key}").contents()
        assert (got if isinstance(got, list) else [got] * len(shapes)) == [getattr(s, field) for s in shapes]
        assert reader.get_field(f"transact.{field}").contents() == [getattr(s, field) for s in shapes]
    assert reader.get_field(f"{arch}.attention.key_length").contents() == 64
    # the tokenizer is the source GGUF's, byte for byte
    assert reader.get_field("tokenizer.ggml.pre").contents() == "smollm"


@pytest.mark.slow
def test_llama_cpp_kv_cache_is_the_per_layer_sum(pruned_dirs, tmp_path):
    src = pruned_dirs["per_layer"]
    out = export(GGUFExportOptions(str(src), "f16", tmp_path / "m.gguf"))
    config = load(str(src)).model.config
    n_ctx = 4096
    expected = sum(2 * s.n_kv_head * head_dim(config) * 2 * n_ctx for s in layer_shapes(config))  # f16 K and V
    rt = open_gguf(out, n_ctx=n_ctx, flash_attn=True)
    kv = rt.kv_cache()
    rt.llm.close()
    assert kv["cells"] == n_ctx and not kv["v_padded"]
    assert abs(kv["mib"] - expected / 2**20) < 0.006, (kv, expected / 2**20)
    assert abs(kv["k_mib"] - kv["v_mib"]) < 0.006


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform", "per_layer"])
def test_import_round_trip(pruned_dirs, tmp_path, kind):
    src = pruned_dirs[kind]
    out = export(GGUFExportOptions(str(src), "f32", tmp_path / "m.gguf"))
    a, b = load(str(src)), load(str(out))
    assert layer_shapes(b.model.config) == layer_shapes(a.model.config)
    ids = corpus.stream(a.tokenizer, "wiki", "eval")[:128][None]
    sample = corpus.read_texts("wiki", "eval")[3][:2000]
    assert b.tokenizer(sample)["input_ids"] == a.tokenizer(sample)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(b.model(input_ids=ids).logits, a.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("mode", ["dense", "uniform", "per_layer"])
def test_tiny_models_export_and_load(family, mode, tmp_path, tokenizer):
    model = tiny_model(family)
    s = layer_shapes(model.config)[0]
    group = s.n_head // s.n_kv_head
    widths = {"dense": [s] * 3, "uniform": [LayerShape(group, 1, 64)] * 3,
              "per_layer": [LayerShape(group, 1, 64), LayerShape(s.n_head, s.n_kv_head, 128), LayerShape(group, 1, 96)]}[mode]
    x = corpus.stream(tokenizer, "wiki", "eval")[:64]
    pruned = cut(model, plan.select(from_stats(collect(model, x[None]), layer_shapes(model.config)), layer_shapes(model.config), widths))
    save(tmp_path / "ckpt", pruned, tokenizer)
    out = export(GGUFExportOptions(str(tmp_path / "ckpt"), "f32", tmp_path / "m.gguf"))
    arch = gguf.GGUFReader(out).get_field("general.architecture").contents()
    assert arch == {"dense": "qwen2" if family == "qwen2" else "llama", "per_layer": "deci",
                    "uniform": "deci" if family == "qwen2" else "llama"}[mode]
    result = verify(out, pruned, tokenizer, "f32", n_tokens=64)
    # random weights give nearly flat logits, so top-1 ties may flip: compare the logits themselves
    assert result.agreement.max_abs_diff < 1e-2 and result.agreement.kl < 1e-5, result.line()


@pytest.mark.parametrize("argv,needle", [
    (["--outtype", "q3_x"], "unknown --outtype"),
    (["--format", "tflite"], "unknown --format"),
])
def test_export_bad_options(argv, needle, tmp_path, tiny_llama_dir, capsys):
    rc = main(["export", str(tiny_llama_dir), *argv, "--outfile", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_export_missing_dir_and_unrepresentable(tmp_path, tokenizer, capsys):
    rc = main(["export", str(tmp_path / "nope"), "--outfile", str(tmp_path / "m.gguf")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    model = tiny_model("llama")
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    save(tmp_path / "ckpt", model, tokenizer)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["export", str(tmp_path / "ckpt"), "--outfile", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "rope scaling" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_k_quant_through_llama_cpp(pruned_dirs, tmp_path):
    out = export(GGUFExportOptions(str(pruned_dirs["uniform"]), "q6_k", tmp_path / "m.gguf"))
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) > 1}
    assert types - {"Q6_K"}, "576-wide rows cannot all be Q6_K: llama.cpp falls back for them"
    loaded = load(str(pruned_dirs["uniform"]))
    result = verify(out, loaded.model, loaded.tokenizer, "q6_k", n_tokens=128)
    assert result.agreement.top1 > 0.8, result.line()
    record = json.loads(json.dumps(result.agreement.as_dict()))  # what transact.json/bench rows carry
    assert record["top1"] == result.agreement.top1 and record["tokens"] == 128


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["q5_1", "q5_0", "q4_1"])
def test_every_gguf_py_type_is_written_and_runs(pruned_dirs, tmp_path, outtype):
    """The types the frontier compares at: weights stored in the type (rows of 576 and 768 fill its
    blocks of 32), and llama.cpp agrees with PyTorch about as well as a 4-5 bit type can."""
    src = pruned_dirs["uniform"]
    out = export(GGUFExportOptions(str(src), outtype, tmp_path / "m.gguf"))
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_q.weight"] == outtype.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    loaded = load(str(src))
    result = verify(out, loaded.model, loaded.tokenizer, outtype, n_tokens=128)
    assert result.passed and result.agreement.top1 > 0.6, result.line()  # exact up to 8-bit activations


def test_gguf_metadata_declares_the_source_as_base_model(tmp_path, tiny_llama_dir, capsys):
    """general.* keys as hubs and llama.cpp front-ends read them: license and basename carried from the
    source's model card, the pruned model's own size label, the source as general.base_model.0."""
    import shutil

    from transact_edge.cli import main
    from transact_edge.ggufmap import read_header, read_kv

    src = tmp_path / "Tiny-Chat-1M"
    shutil.copytree(tiny_llama_dir, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# Tiny Chat\n")
    assert main(["prune", "--model", str(src), "--kv-heads", "1", "--mlp-ratio", "0.5", "--calib-samples", "2",
                 "--seq-len", "32", "--out", str(tmp_path / "p")]) == 0
    assert main(["export", str(tmp_path / "p"), "--outtype", "f32", "--outfile", str(tmp_path / "p.gguf")]) == 0
    meta = {k: v for k, v, *_ in read_kv(tmp_path / "p.gguf", "general.")}
    params = sum(int(torch.tensor(shape).prod()) for _, shape, _ in read_header(tmp_path / "p.gguf")[1])
    assert meta["general.license"] == "apache-2.0" and meta["general.languages"] == ["en"]
    assert meta["general.base_model.count"] == 1 and meta["general.base_model.0.name"]
    assert meta["general.size_label"] == gguf.utility.size_label(params, 0, 0, 0)
    assert meta["general.finetune"] == "transact" and "pruned" in meta["general.tags"]
    assert meta["general.basename"].lower().startswith("tiny")


def _faulty(monkeypatch, fault: str) -> None:
    """One way an exporter can be wrong, planted for the duration of a test."""
    from transact_edge.exporters import gguf as exporter

    permute, rope, infos = exporter.permute_qk, exporter._rope_theta, exporter._tensor_infos
    eps = gguf.GGUFWriter.add_layer_norm_rms_eps
    if fault == "q/k rows unpermuted":
        monkeypatch.setattr(exporter, "permute_qk", lambda key, w, shapes, back=False: w)
    elif fault == "q/k bias unpermuted":
        monkeypatch.setattr(exporter, "permute_qk",
                            lambda key, w, shapes, back=False: w if w.ndim == 1 else permute(key, w, shapes, back))
    elif fault == "bias dropped":
        class NoBias:
            def __init__(self, f):
                self.f = f

            def keys(self):
                return [k for k in self.f.keys() if not k.endswith(".bias")]

            def __getattr__(self, name):
                return getattr(self.f, name)
        monkeypatch.setattr(exporter, "_tensor_infos", lambda w, files, *a: infos(w, [NoBias(f) for f in files], *a))
    elif fault == "norm epsilon wrong":
        monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, v: eps(self, v * 10))
    elif fault == "rope base wrong":
        monkeypatch.setattr(exporter, "_rope_theta", lambda config: 2 * rope(config))


@pytest.mark.parametrize("fault", ["q/k rows unpermuted", "q/k bias unpermuted", "bias dropped",
                                   "norm epsilon wrong", "rope base wrong", None])
def test_exactness_check_fails_every_wrong_mapping(fault, tmp_path, tokenizer, monkeypatch, capsys):
    """A per-layer Qwen2 (deci: rows and biases permuted, per-layer heads) exported as F32 with one fault
    planted: the exactness check (flash attention off, F32 KV, the file's own rounding) fails and the
    export exits 1; the same export without a fault passes."""
    from helpers import tiny_model
    from test_surgery import plans_for

    from transact_edge.shapes import LayerShape
    from transact_edge.surgery import cut

    model = tiny_model("qwen2")
    torch.manual_seed(0)
    with torch.no_grad():  # biases that matter (transformers initialises them to zero)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(torch.randn_like(proj.bias))
    save(tmp_path / "ckpt", cut(model, plans_for(model, [LayerShape(6, 3, 128), LayerShape(2, 1, 64),
                                                          LayerShape(4, 2, 96)])), tokenizer)
    if fault:
        _faulty(monkeypatch, fault)
    rc = main(["export", str(tmp_path / "ckpt"), "--outtype", "f32", "--outfile", str(tmp_path / "m.gguf"), "--verify"])
    out = capsys.readouterr().out
    assert "exact (flash attention off, F32 KV)" in out and "deployment drift (flash attention on, F16 KV)" in out
    assert (rc, "-> FAIL" in out) == ((1, True) if fault else (0, False)), out


def test_large_qk_biases_drift_in_deployment_while_the_file_is_exact(tmp_path, tokenizer, capsys):
    """Large q/k biases (as Qwen2's): llama.cpp's flash-attention path with an F16 KV cache drifts from
    PyTorch, the exact settings do not; the drift is reported on its own line and does not fail."""
    from helpers import tiny_model

    model = tiny_model("qwen2")
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.bias.copy_(10 * torch.randn_like(proj.bias))
    save(tmp_path / "ckpt", model, tokenizer)
    out = export(GGUFExportOptions(str(tmp_path / "ckpt"), "f32", tmp_path / "m.gguf"))
    v = verify(out, model, tokenizer, "f32", n_tokens=256)
    assert v.passed, v.line()
    assert v.drift.max_abs_diff > 100 * v.exact.max_abs_diff and v.drift.top1 < 1.0, v.line()
