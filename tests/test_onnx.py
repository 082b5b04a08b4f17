"""ONNX export with a per-layer KV cache, driven by plain onnxruntime."""
import numpy as np
import pytest
import torch

from transact_edge import corpus, depth, plan
from transact_edge.calibration import collect
from transact_edge.salience import from_stats
from transact_edge.checkpoint import save
from transact_edge.cli import main
from transact_edge.exporters.onnx import ONNXExportOptions, export, verify
from transact_edge.ortruntime import OrtModel
from transact_edge.shapes import LayerShape, layer_shapes
from transact_edge.surgery import cut

from helpers import TINY, tiny_model


def _tiny_checkpoint(family, per_layer, path, tokenizer):
    model = tiny_model(family)
    s = layer_shapes(model.config)[0]
    group = s.n_head // s.n_kv_head
    widths = ([LayerShape(group, 1, 64), LayerShape(s.n_head, s.n_kv_head, 128), LayerShape(group, 1, 96)]
              if per_layer else [LayerShape(group, 1, 64)] * 3)
    x = corpus.stream(tokenizer, "wiki", "eval")[:64]
    pruned = cut(model, plan.select(from_stats(collect(model, x[None]), layer_shapes(model.config)), layer_shapes(model.config), widths))
    save(path, pruned, tokenizer)
    return pruned


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("per_layer", [False, True])
def test_tiny_export_matches_torch_and_decodes_with_past(family, per_layer, tmp_path, tokenizer):
    pruned = _tiny_checkpoint(family, per_layer, tmp_path / "ckpt", tokenizer)
    out = export(ONNXExportOptions(str(tmp_path / "ckpt"), tmp_path / "m.onnx"))
    ort = OrtModel(out)
    assert [h for _, h, _ in ort.past] == [s.n_kv_head for s in layer_shapes(pruned.config) for _ in range(2)]
    ids = corpus.stream(tokenizer, "wiki", "eval")[:40].view(2, 20)
    with torch.no_grad():
        ref = pruned(input_ids=ids).logits
    full = ort.logits(ids)
    assert (full - ref).abs().max() < 1e-4
    # a decode step with a non-empty past equals the full-sequence forward
    first, past = ort.forward(ids[:, :15].numpy(), ort.empty_past(2))
    rest, past = ort.forward(ids[:, 15:].numpy(), past)
    assert np.abs(rest - full[:, 15:].numpy()).max() < 1e-4
    assert next(iter(past.values())).shape[2] == 20


def test_int8_quantization_reports_drift(tmp_path, tokenizer):
    pruned = _tiny_checkpoint("llama", True, tmp_path / "ckpt", tokenizer)
    out = export(ONNXExportOptions(str(tmp_path / "ckpt"), tmp_path / "m-int8.onnx", quantize="int8"))
    result = verify(out, pruned, tokenizer, "int8", n_tokens=64, n_generate=4)
    assert result.passed is None and "int8" in result.line()
    assert 0 < result.agreement.max_abs_diff < 5  # quantized, so not identical, but close
    beside = {"genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt", "m-int8.onnx"} | beside  # no temporary left


@pytest.mark.slow
def test_real_pruned_export_parity_and_greedy_text(smollm2, tmp_path, capsys):
    """Per-layer widths (every layer its own shapes in the graph and the genai config), on the real model's
    first 8 layers: the export's cost grows with the depth, and the whole 30-layer real export is the demo's,
    verified in every CI run; tiny uniform models are exported above."""
    model = depth.drop(smollm2.model, list(range(8, smollm2.model.config.num_hidden_layers)))
    ids = corpus.stream(smollm2.tokenizer)[: 2 * 256].view(2, 256)
    stats = from_stats(collect(model, ids), layer_shapes(model.config))
    shapes = layer_shapes(model.config)
    widths = plan.per_layer_widths(stats, shapes, LayerShape(6, 2, 768), 32)
    pruned = cut(model, plan.select(stats, shapes, widths))
    save(tmp_path / "ckpt", pruned, smollm2.tokenizer)
    rc = main(["export", str(tmp_path / "ckpt"), "--format", "onnx", "--outfile", str(tmp_path / "m.onnx"), "--verify"])
    out = capsys.readouterr().out
    assert rc == 0 and "32 greedy tokens consistent -> PASS" in out, out
    # onnxruntime-genai runs the same files (genai_config.json and tokenizer beside the graph): same greedy text
    prompt = smollm2.tokenizer("The history of the city begins")["input_ids"]
    with torch.no_grad():
        want = pruned.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert _genai_greedy(tmp_path, prompt, 16) == want


@pytest.mark.parametrize("argv,needle", [
    (["--dtype", "int4"], "unknown --dtype"),
    (["--quantize", "int2"], "unknown --quantize"),
    (["--quantize", "int4", "--block-size", "24"], "--block-size must be a power of two"),
    (["--quantize", "int4", "--int4-algo", "gptq"], "unknown --int4-algo"),
    (["--dtype", "fp16", "--quantize", "int8"], "starts from --dtype fp32"),
])
def test_onnx_bad_options(argv, needle, tmp_path, tiny_llama_dir, capsys):
    rc = main(["export", str(tiny_llama_dir), "--format", "onnx", *argv, "--outfile", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_eval_cli_through_onnxruntime(tmp_path, tokenizer, capsys):
    _tiny_checkpoint("mistral", True, tmp_path / "ckpt", tokenizer)
    out = export(ONNXExportOptions(str(tmp_path / "ckpt"), tmp_path / "m.onnx"))
    args = ["eval", str(tmp_path / "ckpt"), "--ppl", "--window", "64", "--max-tokens", "256"]
    assert main(args) == 0
    torch_line = capsys.readouterr().out
    assert main(args + ["--runtime", "onnxruntime", "--onnx", str(out)]) == 0
    ort_line = capsys.readouterr().out
    assert "[runtime: onnxruntime]" in ort_line and "window 64, stride 64, 252 tokens scored" in ort_line
    ppl = lambda line: float(line.split("perplexity ")[1].split()[0])  # noqa: E731
    assert abs(ppl(ort_line) / ppl(torch_line) - 1) < 1e-4
    assert main(args + ["--runtime", "onnxruntime"]) == 2


def test_fp16_export_runs_with_a_half_precision_cache(tmp_path, tokenizer):
    pruned = _tiny_checkpoint("qwen2", False, tmp_path / "ckpt", tokenizer)
    out = export(ONNXExportOptions(str(tmp_path / "ckpt"), tmp_path / "m16.onnx", dtype="fp16"))
    ort = OrtModel(out)
    assert ort.kv_dtype == np.float16
    result = verify(out, pruned, tokenizer, "fp16", n_tokens=64, n_generate=4)
    assert result.passed is None and result.agreement.max_abs_diff < 0.05, result.line()


def _genai_greedy(directory, prompt: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("per_layer", [False, True])
def test_onnxruntime_genai_runs_the_export_as_written(tmp_path, tokenizer, per_layer):
    """The default output directory is what onnxruntime-genai's Model(dir) reads, with no edits:
    uniform and per-layer KV heads, the tokenizer and chat template, the search defaults."""
    import json

    import onnxruntime_genai as og

    pruned = _tiny_checkpoint("qwen2", per_layer, tmp_path / "ckpt", tokenizer)
    graph = export(ONNXExportOptions(str(tmp_path / "ckpt")))
    assert graph == tmp_path / "ckpt-onnx-fp32" / "model.onnx"
    config = json.loads((graph.parent / "genai_config.json").read_text())
    assert config["model"]["type"] == "qwen2" and config["model"]["decoder"]["filename"] == "model.onnx"
    assert config["model"]["context_length"] == pruned.config.max_position_embeddings
    assert config["search"]["max_length"] == config["model"]["context_length"]
    prompt = tokenizer("The history of the city begins with")["input_ids"]
    with torch.no_grad():
        want = pruned.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert _genai_greedy(graph.parent, prompt, 6) == want
    tok = og.Tokenizer(og.Model(str(graph.parent)))
    chat = json.dumps([{"role": "user", "content": "Hi"}])
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)


def test_int4_matmulnbits_runs_in_onnxruntime_and_genai(tmp_path, tokenizer):
    import onnx

    pruned = _tiny_checkpoint("llama", True, tmp_path / "ckpt", tokenizer)
    graph = export(ONNXExportOptions(str(tmp_path / "ckpt"), quantize="int4"))
    assert graph.parent.name == "ckpt-onnx-fp32-int4"
    ops = {n.op_type for n in onnx.load(str(graph)).graph.node}
    assert "MatMulNBits" in ops
    result = verify(graph, pruned, tokenizer, "int4", n_tokens=64, n_generate=4)
    assert result.passed and "4-bit round-to-nearest" in result.rule, result.line()  # against its own weights
    assert len(_genai_greedy(graph.parent, [1, 2, 3, 4], 4)) == 4
