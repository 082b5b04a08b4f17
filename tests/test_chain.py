"""The whole chain through the CLI on tiny models of the shapes CI must keep working: prune -> GGUF export
with --verify -> ONNX export with --verify -> bench of both files.

(a) Llama 3.x: llama3 rope scaling, written as rope_freqs.weight (a short original context, so that the
    verified positions reach its scaled pairs); (b) Qwen2: q/k/v biases and GQA 4:1 (8 heads, 2 KV heads), in llama.cpp's own qwen2 graph.
"""
import json

import pytest
import torch

from transact_edge.checkpoint import save
from transact_edge.cli import main
from transact_edge.ggufmap import read_header

from helpers import LLAMA3, tiny_model


def _qwen2_gqa4():
    model = tiny_model("qwen2", hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                       tie_word_embeddings=True)  # as Qwen2-0.5B/1.5B; and half the export work
    torch.manual_seed(0)
    with torch.no_grad():  # biases that matter (transformers initialises them to zero)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(torch.randn_like(proj.bias))
    return model


CHAINS = {  # source model, prune widths, the llama.cpp graph the pruned model becomes
    "llama3 rope": (lambda: tiny_model("llama", rope_parameters=LLAMA3), ["--kv-heads", "1", "--mlp-ratio", "0.5"],
                    "llama"),
    "qwen2 biases gqa 4:1": (_qwen2_gqa4, ["--mlp-ratio", "0.5"], "qwen2"),
}


def _run(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, f"{argv[0]} exited {rc}:\n{out}\n{err}"
    return out


@pytest.mark.parametrize("chain", CHAINS)
def test_prune_export_verify_bench(chain, tmp_path, tokenizer, capsys):
    build, widths, arch = CHAINS[chain]
    source = build()
    save(tmp_path / "src", source, tokenizer)
    pruned, gguf_file, onnx_file = tmp_path / "pruned", tmp_path / "pruned.gguf", tmp_path / "onnx" / "model.onnx"
    capsys.readouterr()
    _run(capsys, "prune", "--model", tmp_path / "src", *widths, "--calib-samples", "2", "--seq-len", "32",
         "--out", pruned)
    config = json.loads((pruned / "config.json").read_text())
    assert config["rope_parameters"] == source.config.rope_parameters
    assert config["num_attention_heads"] // config["num_key_value_heads"] >= 3

    out = _run(capsys, "export", pruned, "--format", "gguf", "--outfile", gguf_file, "--verify")
    assert "exact (flash attention off, F32 KV)" in out and "-> PASS" in out, out
    kv, tensors = read_header(gguf_file)
    assert dict((k, v) for k, v, *_ in kv)["general.architecture"] == arch
    assert ("rope_freqs.weight" in [name for name, *_ in tensors]) == (source.config.rope_parameters["rope_type"] == "llama3")

    onnx_file.parent.mkdir()
    out = _run(capsys, "export", pruned, "--format", "onnx", "--outfile", onnx_file, "--verify")
    assert "PASS" in out and "FAIL" not in out, out

    for model, runtime in ((gguf_file, "llama.cpp"), (onnx_file, "onnxruntime")):
        rep = json.loads(_run(capsys, "bench", model, "--runtime", runtime, "-p", "16", "-n", "4", "-r", "1",
                              "-o", "json"))
        assert rep["rows"] and all(r["ts_mean"] > 0 for r in rep["rows"]), rep
