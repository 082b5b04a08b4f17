import copy
import subprocess
import sys

import pytest
import torch
import transformers

from transact_edge import plan
from transact_edge.arch import FAMILIES
from transact_edge.calibration import collect
from transact_edge.salience import from_stats
from transact_edge.errors import UserError
from transact_edge.shapes import LayerShape, head_dim, layer_shapes
from transact_edge.surgery import cut

from helpers import TINY, tiny_model

X = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))


def test_every_family_has_a_tiny_model():
    assert set(TINY) == set(FAMILIES), "add a tiny config for every supported family"


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def masked(model, plans):
    """The dense model with every pruned head's o_proj columns and channel's down_proj columns zeroed."""
    m = copy.deepcopy(model)
    hd = head_dim(m.config)
    for layer, p, s in zip(m.model.layers, plans, layer_shapes(m.config)):
        keep_heads = torch.zeros(s.n_head)
        keep_heads[p.heads] = 1
        layer.self_attn.o_proj.weight.data *= keep_heads.repeat_interleave(hd)[None]
        keep_ch = torch.zeros(s.ffn_dim)
        keep_ch[p.channels] = 1
        layer.mlp.down_proj.weight.data *= keep_ch[None]
    return m


def plans_for(model, widths):
    stats = from_stats(collect(model, X), layer_shapes(model.config))
    return plan.select(stats, layer_shapes(model.config), widths)


@pytest.mark.parametrize("family", sorted(TINY))
def test_pruning_nothing_changes_nothing(family):
    model = tiny_model(family)
    new = cut(model, plans_for(model, layer_shapes(model.config)))
    assert torch.equal(logits(new), logits(model))


@pytest.mark.parametrize("family", sorted(TINY))
def test_pruned_equals_masked_dense_uniform(family):
    model = tiny_model(family)
    s = layer_shapes(model.config)[0]
    group = s.n_head // s.n_kv_head
    widths = [LayerShape((s.n_kv_head - 1) * (group - 1 or 1), s.n_kv_head - 1, 64)] * 3
    plans = plans_for(model, widths)
    new = cut(model, plans)
    assert type(new) is type(model)
    assert new.config.num_key_value_heads == s.n_kv_head - 1 and new.config.intermediate_size == 64
    torch.testing.assert_close(logits(new), logits(masked(model, plans)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY))
def test_pruned_equals_masked_dense_per_layer_and_reloads(family, tmp_path):
    model = tiny_model(family)
    s = layer_shapes(model.config)[0]
    group = s.n_head // s.n_kv_head
    widths = [LayerShape(group, 1, 32), LayerShape(s.n_head, s.n_kv_head, 128), LayerShape(s.n_kv_head, s.n_kv_head, 96)]
    plans = plans_for(model, widths)
    new = cut(model, plans)
    assert layer_shapes(new.config) == widths
    torch.testing.assert_close(logits(new), logits(masked(model, plans)), rtol=1e-5, atol=1e-5)
    new.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(back), logits(new))
    # incremental decoding with a per-layer KV cache gives the same next tokens as a full forward
    out = back.generate(X[:1], max_new_tokens=4, do_sample=False)
    full = logits(back, out[:, :-1])[0, -4:].argmax(-1)
    assert torch.equal(out[0, -4:], full)


def test_gqa_mapping_survives_removing_query_heads_inside_groups():
    model = tiny_model("llama")  # 6 query heads, 2 KV groups of 3
    plans = [plan.LayerPlan([0, 1], [1, 2, 3, 5], list(range(128)))] * 3
    new = cut(model, plans)
    assert new.config.num_attention_heads == 4 and new.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(new), logits(masked(model, plans)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [
    plan.LayerPlan([0, 1], [1, 2, 3], list(range(128))),       # 2 heads in group 0, 1 in group 1
    plan.LayerPlan([0], [1, 4], list(range(128))),              # head 4 reads a removed group
    plan.LayerPlan([0, 1], [0, 0, 3, 4], list(range(128))),     # duplicate
    plan.LayerPlan([0, 1], list(range(6)), [5, 200]),           # out of range
])
def test_invalid_plans_are_refused_before_touching_weights(bad):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError):
        cut(model, [bad] * 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_uniform_checkpoint_loads_in_plain_transformers(tmp_path):
    model = tiny_model("llama")
    new = cut(model, plans_for(model, [LayerShape(2, 1, 64)] * 3))
    new.save_pretrained(tmp_path)
    torch.save(logits(new), tmp_path / "expected.pt")
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "assert 'transact_edge' not in sys.modules\n"
        f"x = torch.tensor({X.tolist()})\n"
        "with torch.no_grad(): got = m(input_ids=x).logits\n"
        f"assert torch.equal(got, torch.load({str(tmp_path / 'expected.pt')!r}))\n"
        "print(type(m).__name__, m.config.num_attention_heads, m.config.num_key_value_heads, m.config.intermediate_size)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["LlamaForCausalLM", "2", "1", "64"]


def test_consuming_cut_gives_the_same_model():
    model = tiny_model("qwen2")
    plans = plans_for(model, [LayerShape(2, 2, 64)] * 3)
    expected = logits(cut(model, plans))
    got = cut(model, plans, consume=True)
    assert torch.equal(logits(got), expected)
    assert all(p.is_meta for p in model.model.layers.parameters())  # the old layers were released


@pytest.mark.parametrize("family", sorted(TINY))
def test_heads_that_do_not_divide_the_hidden_size_survive_a_shot_checkpoint(family, tmp_path, tokenizer):
    """5 query heads of 16 on a hidden size of 96: the stock config refuses it, so the model is saved as
    the per-layer variant — at every shot's checkpoint (save_pretrained validates) and at the end."""
    from transact_edge.checkpoint import save
    from transact_edge.cli import main

    save(tmp_path / "dense", tiny_model(family, num_attention_heads=6, num_key_value_heads=1), tokenizer)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tmp_path / "dense"), "--heads", "5", "--kv-heads", "1", "--mlp", "64",
                 "--shots", "2", "--train-tokens", "0", "--calib-samples", "4", "--seq-len", "64",
                 "--out", str(out)]) == 0
    import transact_edge.modeling  # noqa: F401  (registers the per-layer classes)

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert [s.n_head for s in layer_shapes(model.config)] == [5] * model.config.num_hidden_layers
    assert torch.isfinite(logits(model)).all()
