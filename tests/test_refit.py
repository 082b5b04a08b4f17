"""The refit at the cut (prune --reconstruct): the closed form is the ridge argmin, nothing cut changes
nothing, a cut layer's output error on calibration tokens goes down, and the CLI's --plan / --stream rules."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from helpers import tiny_model

from transact_edge import plan, refit
from transact_edge.salience import acts
from transact_edge.shapes import LayerShape, head_dim, layer_shapes
from transact_edge.surgery import cut, unit_rows


def test_closed_form_is_the_ridge_argmin():
    """W_K + W_D G_DK (G_KK + lam I)^-1 against least squares on the stacked system [X_K; sqrt(lam) I]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, dtype=torch.float64, generator=g) @ torch.randn(12, 12, dtype=torch.float64, generator=g)
    w = torch.randn(5, 12, dtype=torch.float64, generator=g)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    gram = x.T @ x
    rel = 1e-2
    lam = rel * gram[kept][:, kept].diagonal().mean()
    a = torch.cat([x[:, kept], lam.sqrt() * torch.eye(len(kept), dtype=torch.float64)])
    b = torch.cat([x @ w.T, lam.sqrt() * w[:, kept].T])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(refit.ridge(w, kept, gram, rel), want, rtol=1e-9, atol=1e-9)
    assert refit.error(w, kept, want, gram) < refit.error(w, kept, w[:, kept], gram)


def _windows(n: int = 8, seq_len: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 49152, (n, seq_len), generator=g)


def _dense_plans(model) -> list[plan.LayerPlan]:
    return [plan.LayerPlan(list(range(s.n_kv_head)), list(range(s.n_head)), list(range(s.ffn_dim)))
            for s in layer_shapes(model.config)]


def test_nothing_cut_reproduces_the_dense_layers():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    record = refit.refit(model, _dense_plans(model), _windows(), head_dim(model.config), batch_size=4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
    ids = _windows(2)
    dense = tiny_model("llama")
    torch.testing.assert_close(cut(model, _dense_plans(model))(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
    assert len(record["layers"]) == 3 and record["held_windows"] == 1 and record["fit_windows"] == 7


def _dense_grams(dense, windows) -> list[dict[str, refit.Gram]]:
    """Per layer, the Grams of o_proj's and down_proj's inputs in the dense model over `windows`."""
    states = refit.layer0_inputs(dense, windows, 4)
    grams = []
    for layer in dense.model.layers:
        gs = {"o_proj": refit.Gram(layer.self_attn.o_proj.in_features, "cpu"),
              "down_proj": refit.Gram(layer.mlp.down_proj.in_features, "cpu")}
        hs = [layer.self_attn.o_proj.register_forward_pre_hook(gs["o_proj"].hook),
              layer.mlp.down_proj.register_forward_pre_hook(gs["down_proj"].hook)]
        with torch.no_grad():
            states = [(layer(h, **kw), kw) for h, kw in states]
        for h in hs:
            h.remove()
        grams.append(gs)
    return grams


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_cut_layer_reproduces_the_dense_layer_better(family):
    """On all the calibration tokens, each cut module's output error (dense inputs) is lower after the
    refit wherever a ridge strength was chosen, and never higher: the ridge objective at the solution is
    at most its value at the old weights. (In a random model kept and cut heads are independent, so the
    held-apart windows rightly decline some refits: gains there are sample noise.)"""
    dense = tiny_model(family)
    windows = _windows(32, 64)
    shapes = layer_shapes(dense.config)
    s = shapes[0]
    plans = plan.select(acts(dense, windows, shapes, 8, 0), shapes,
                        [LayerShape(s.n_head // s.n_kv_head, 1, s.ffn_dim // 2)] * len(shapes))
    refitted = copy.deepcopy(dense)
    record = refit.refit(refitted, plans, windows, head_dim(dense.config), batch_size=8)
    lower, hd = 0, head_dim(dense.config)
    for il, (p, gs) in enumerate(zip(plans, _dense_grams(dense, windows))):
        for name, kept in (("o_proj", unit_rows(p.heads, hd)), ("down_proj", torch.tensor(p.channels))):
            key = f"model.layers.{il}.{'self_attn' if name == 'o_proj' else 'mlp'}.{name}.weight"
            w, new = dense.state_dict()[key], refitted.state_dict()[key]
            gram = gs[name].fit  # every calibration window: the ones fitted and the ones held apart
            none = refit.error(w, kept, w[:, kept].double(), gram)
            ours = refit.error(w, kept, new[:, kept].double(), gram)
            chosen = record["layers"][il][name]["ridge"] is not None
            assert chosen != torch.equal(new, w), (il, name)
            assert (ours < none) if chosen else (ours == none), (il, name, ours, none)
            lower += chosen
    assert lower >= 2, record["layers"]


def _prune(main, model, out, *extra) -> int:
    return main(["prune", "--model", str(model), "--kv-heads", "1", "--mlp-ratio", "0.5", "--calib-samples", "4",
                 "--seq-len", "32", "--out", str(out), *extra])


def test_plan_with_reconstruct_calibrates_and_says_so(tiny_llama_dir, tmp_path, caplog):
    from transact_edge.cli import main
    from transact_edge.loading import load

    assert _prune(main, tiny_llama_dir, tmp_path / "a", "--reconstruct") == 0
    made = json.loads((tmp_path / "a" / "transact.json").read_text())
    assert made["options"]["reconstruct"] and len(made["shots"][0]["refit"]["layers"]) == 3
    assert all({"o_proj", "down_proj"} <= set(layer) for layer in made["shots"][0]["refit"]["layers"])
    replay = ["prune", "--model", str(tiny_llama_dir), "--plan", str(tmp_path / "a"), "--calib-samples", "4",
              "--seq-len", "32"]
    assert main([*replay, "--out", str(tmp_path / "plain")]) == 0
    with caplog.at_level(logging.INFO, logger="transact_edge"):
        assert main([*replay, "--reconstruct", "--out", str(tmp_path / "b")]) == 0
    said = [r.getMessage() for r in caplog.records if "--plan with --reconstruct" in r.getMessage()]
    assert len(said) == 1 and "calibrating on 4 windows" in said[0]
    replayed = json.loads((tmp_path / "b" / "transact.json").read_text())
    assert replayed["shots"][0]["refit"]["layers"] == made["shots"][0]["refit"]["layers"]
    a, b, plain = (load(str(tmp_path / n)).model.state_dict() for n in ("a", "b", "plain"))
    for k in a:  # the same refit as at the cut; only o_proj and down_proj differ from the plain replay
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
        assert torch.equal(b[k], plain[k]) or k.endswith(("o_proj.weight", "down_proj.weight")), k


def test_stream_and_too_few_windows_are_refused(tiny_llama_dir, tmp_path, capsys):
    from transact_edge.cli import main

    for extra, needle in ((["--stream"], "drop --stream or --reconstruct"),
                          (["--calib-samples", "1"], "--calib-samples must be at least 2")):
        capsys.readouterr()
        assert _prune(main, tiny_llama_dir, tmp_path / "bad", "--reconstruct", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "bad").exists()
