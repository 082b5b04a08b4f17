import torch

from transact_edge import salience
from transact_edge.calibration import collect, hooked

from conftest import tiny_model


def test_head_score_is_mean_plus_alpha_max():
    ch = torch.tensor([1.0, 3.0, 2.0, 2.0,   4.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # 2 heads x 4
    got = salience.head_scores(ch, n_head=2)
    alpha = 10.0 / 4
    assert torch.allclose(got, torch.tensor([2.0 + alpha * 3.0, 1.0 + alpha * 4.0], dtype=torch.float64))


def test_group_score_sums_the_query_heads_of_each_group():
    heads = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 0.0])  # 6 query heads, 2 KV groups of 3
    assert salience.group_scores(heads, n_kv_head=2).tolist() == [6.0, 10.0]


def test_hooks_sum_squares_of_every_token_in_float64():
    model = tiny_model("llama")
    x = torch.randint(0, 1000, (5, 12))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    stats = collect(model, x, batch_size=2)  # 3 batches: every one must count, not only the last
    handle.remove()
    acts = torch.cat([a.reshape(-1, a.shape[-1]) for a in seen]).double()
    assert stats.tokens == x.numel()
    assert stats.mlp[1].dtype == torch.float64
    assert torch.allclose(stats.mlp[1], (acts ** 2).sum(0), rtol=1e-5)
    assert len(stats.mha) == 3 and stats.mha[0].numel() == 6 * 16


def test_hooks_are_removed_after_an_error():
    model = tiny_model("llama")
    try:
        with hooked(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(not l.self_attn.o_proj._forward_pre_hooks for l in model.model.layers)
