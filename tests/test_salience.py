import torch

from transact_edge import salience
from transact_edge.calibration import collect, hooked

from helpers import tiny_model


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
    hooked_modules = [m for l in model.model.layers for m in (l.self_attn.o_proj, l.mlp.down_proj)]
    try:
        with hooked(model):
            assert all(len(m._forward_pre_hooks) == 1 for m in hooked_modules)  # the hooks were there
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(not m._forward_pre_hooks for m in hooked_modules)


def _shapes(model):
    from transact_edge.shapes import layer_shapes
    return layer_shapes(model.config)


def test_magnitude_scores_are_weight_norms_of_each_structure():
    model = tiny_model("qwen2")  # q/k/v biases join their rows
    shapes = _shapes(model)
    got = salience.magnitude(model, None, shapes, 1, 0)
    attn, mlp, hd = model.model.layers[1].self_attn, model.model.layers[1].mlp, 16
    h = 4  # query head 4 reads KV group 4 // 2 = 2
    q = torch.cat([attn.q_proj.weight[h * hd:(h + 1) * hd].flatten(), attn.q_proj.bias[h * hd:(h + 1) * hd]])
    o = attn.o_proj.weight[:, h * hd:(h + 1) * hd].flatten()
    assert torch.allclose(got.heads[1][h], torch.cat([q, o]).double().norm())
    g = 2
    kv = torch.cat([p[g * hd:(g + 1) * hd].flatten() for p in (attn.k_proj.weight, attn.k_proj.bias,
                                                                 attn.v_proj.weight, attn.v_proj.bias)]).double()
    members = sum(got.heads[1][i] ** 2 for i in (4, 5))
    assert torch.allclose(got.groups[1][g], (kv.square().sum() + members).sqrt())
    c = 7
    ch = torch.cat([mlp.gate_proj.weight[c], mlp.up_proj.weight[c], mlp.down_proj.weight[:, c]]).double()
    assert torch.allclose(got.channels[1][c], ch.norm())


def test_taylor_scores_are_grad_times_weight_over_all_batches():
    model = tiny_model("llama")
    x = torch.randint(0, 1000, (4, 12))
    got = salience.taylor(model, x, _shapes(model), 2, 0)  # 2 batches: both gradients count
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())
    for batch in x.split(2):
        model(input_ids=batch, labels=batch).loss.backward()
    w = model.model.layers[2].mlp.down_proj.weight
    expected = (w.grad.double() * w.detach().double()).abs().sum(dim=0)
    up = model.model.layers[2].mlp.up_proj.weight
    gate = model.model.layers[2].mlp.gate_proj.weight
    for m in (up, gate):
        expected += (m.grad.double() * m.detach().double()).abs().sum(dim=1)
    assert torch.allclose(got.channels[2], expected, rtol=1e-4)


def test_random_scores_are_seeded():
    model = tiny_model("llama")
    a, b, c = (salience.random(model, None, _shapes(model), 1, s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.channels, b.channels))
    assert not torch.equal(a.channels[0], c.channels[0])
