"""The real SmolLM2-135M: the issue's acceptance command, masked-forward equality, reload, resume."""
import json
import subprocess
import sys

import pytest
import torch
import transformers

from transact_edge import corpus, plan
from transact_edge.calibration import collect
from transact_edge.salience import from_stats
from transact_edge.cli import main
from transact_edge.inspect import describe
from transact_edge.loading import embedded_gguf
from transact_edge.shapes import LayerShape, is_uniform, layer_shapes
from transact_edge.surgery import cut

from test_surgery import masked

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_ids(smollm2):
    return corpus.stream(smollm2.tokenizer, "wiki", "eval")[:4 * 128].view(4, 128)


def test_acceptance_command_and_plain_transformers_load(tmp_path):
    out = tmp_path / "X"
    cmd = ["transact-edge", "prune", "--model", "smollm2-135m", "--kv-heads", "2", "--mlp-ratio", "0.5",
           "--shots", "2", "--train-tokens", "0", "--calib-samples", "16", "--seq-len", "256", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.json", "transact.json"):
        assert (out / name).is_file(), name
    code = (f"import sys, transformers\nm = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "assert 'transact_edge' not in sys.modules\nc = m.config\n"
            "a = m.model.layers[0].self_attn\n"
            "print(type(m).__name__, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,"
            " a.q_proj.weight.shape[0], a.k_proj.weight.shape[0], m.model.layers[0].mlp.down_proj.weight.shape[1])")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert got == ["LlamaForCausalLM", "6", "2", "768", str(6 * 64), str(2 * 64), "768"]
    report = json.loads((out / "transact.json").read_text())
    assert [s["widths"][0] for s in report["shots"]] == [{"n_head": 9, "n_kv_head": 3, "ffn_dim": 1152},
                                                         {"n_head": 6, "n_kv_head": 2, "ffn_dim": 768}]
    assert report["dense"]["kv_bytes_per_token_f16"] == 30 * 2 * 3 * 64 * 2
    assert report["pruned"]["kv_bytes_per_token_f16"] == 30 * 2 * 2 * 64 * 2
    assert all(len(k) == 2 for k in report["plan"]["kv_heads"])
    assert all(len(c) == 768 and c == sorted(c) for c in report["plan"]["channels"])
    assert report["calibration"]["tokens"] == 16 * 256


def test_real_model_pruned_equals_masked_dense(smollm2, text_ids):
    model = smollm2.model
    stats = from_stats(collect(model, text_ids[:2]), layer_shapes(model.config))
    shapes = layer_shapes(model.config)
    uni = plan.target(shapes[0], plan.WidthRequest(kv_heads=2, heads=4, mlp_ratio=0.5))
    plans = plan.select(stats, shapes, [uni] * len(shapes))
    pruned = cut(model, plans)
    with torch.no_grad():
        got = pruned(input_ids=text_ids[2:]).logits
        want = masked(model, plans)(input_ids=text_ids[2:]).logits
        dense = model(input_ids=text_ids[2:]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)
    assert (got - dense).abs().max() > 0.1  # something was really removed
    # pruning nothing is the identity on the real model too
    same = cut(model, plan.select(stats, shapes, shapes))
    with torch.no_grad():
        assert torch.equal(same(input_ids=text_ids[2:]).logits, dense)


def test_real_model_per_layer_reload(smollm2, text_ids, tmp_path):
    import transact_edge  # noqa: F401  (registers the per-layer classes)

    model = smollm2.model
    stats = from_stats(collect(model, text_ids[:2]), layer_shapes(model.config))
    shapes = layer_shapes(model.config)
    widths = plan.per_layer_widths(stats, shapes, LayerShape(6, 2, 768), round_to=32)
    assert not is_uniform(widths)
    pruned = cut(model, plan.select(stats, shapes, widths))
    pruned.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert layer_shapes(back.config) == widths
    with torch.no_grad():
        assert torch.equal(back(input_ids=text_ids[2:]).logits, pruned(input_ids=text_ids[2:]).logits)


def test_inspect_embedded_gguf_and_eval_protocol(tmp_path, capsys):
    info = describe(str(embedded_gguf("smollm2-135m")))
    assert info["architecture"] == "llama" and len(info["shapes"]) == 30
    assert set(info["shapes"]) == {LayerShape(9, 3, 1536)}
    assert info["kv_bytes_per_token_f16"] == 30 * 2 * 3 * 64 * 2
    rc = main(["eval", "smollm2-135m", "--ppl", "--max-tokens", "1024", "--window", "256"])
    out = capsys.readouterr().out
    assert rc == 0 and "window 256, stride 256, 1020 tokens scored" in out
    ppl = float(out.split("perplexity ")[1].split()[0])
    assert 5 < ppl < 200


def test_lm_eval_offline_task_and_clear_errors(smollm2, capsys):
    from transact_edge import lmeval

    results, table = lmeval.evaluate(smollm2.model, smollm2.tokenizer, [lmeval.LOCAL_TASK], limit=24, batch_size=4)
    r = results["results"][lmeval.LOCAL_TASK]
    assert 0.0 < r["acc,none"] < 1.0 and 1.0 < r["perplexity,none"] < 1e6, r
    assert lmeval.LOCAL_TASK in table
    for task, needle in (("no_such_task", "unknown lm-eval task"), ("hellaswag", "offline")):
        rc = main(["eval", "smollm2-135m", "--lm-eval", task, "--lm-eval-limit", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and needle in err[-1], err
