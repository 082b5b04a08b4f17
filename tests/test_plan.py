import json

import pytest
import torch

from transact_edge import plan, recovery
from transact_edge.calibration import Stats
from transact_edge.salience import from_stats
from transact_edge.errors import UserError
from transact_edge.shapes import LayerShape

SMOL = LayerShape(9, 3, 1536)


def test_target_kv_heads_keeps_the_group_ratio():
    assert plan.target(SMOL, plan.WidthRequest(kv_heads=2, mlp_ratio=0.5)) == LayerShape(6, 2, 768)


def test_target_query_heads_inside_groups_and_rounding():
    assert plan.target(SMOL, plan.WidthRequest(heads=6, mlp=700)) == LayerShape(6, 3, 700)
    assert plan.target(SMOL, plan.WidthRequest(mlp_ratio=0.3)).ffn_dim == 480  # 460.8 -> multiple of 32
    assert plan.target(SMOL, plan.WidthRequest(mlp_ratio=0.3, round_to=256)).ffn_dim == 512
    assert plan.target(SMOL, plan.WidthRequest(attn_ratio=0.34)) == LayerShape(3, 1, 1536)


@pytest.mark.parametrize("req", [
    plan.WidthRequest(mlp_ratio=0.0), plan.WidthRequest(mlp_ratio=1.2), plan.WidthRequest(attn_ratio=-1),
    plan.WidthRequest(kv_heads=4), plan.WidthRequest(heads=10), plan.WidthRequest(heads=5, kv_heads=2),
    plan.WidthRequest(heads=9, kv_heads=2), plan.WidthRequest(mlp=2000), plan.WidthRequest(mlp=0),
])
def test_bad_widths_are_refused(req):
    with pytest.raises(UserError):
        plan.target(SMOL, req)


def test_step_rule_of_the_reference():
    # 8 shots from MLP 11008 to 1536: next = cur - (cur - target) // remaining
    cur, tgt = LayerShape(32, 32, 11008), LayerShape(6, 6, 1536)
    seen = []
    for shot in range(8):
        cur = plan.step(cur, tgt, 8 - shot, round_to=1)
        seen.append(cur)
    assert seen[0] == LayerShape(29, 29, 11008 - (11008 - 1536) // 8)
    assert seen[-1] == tgt
    assert all(a.ffn_dim >= b.ffn_dim and a.n_kv_head >= b.n_kv_head for a, b in zip(seen, seen[1:]))


def test_linear_token_schedule():
    assert recovery.tokens_per_shot(1000, 4) == [100, 200, 300, 400]
    assert recovery.tokens_per_shot(0, 3) == [0, 0, 0]


def _stats(n_layer: int, seed: int = 0) -> Stats:
    g = torch.Generator().manual_seed(seed)
    mha = [torch.rand(9 * 64, generator=g, dtype=torch.float64) * (il + 1) for il in range(n_layer)]
    mlp = [torch.rand(1536, generator=g, dtype=torch.float64) ** (il + 1) for il in range(n_layer)]
    return Stats(mha, mlp, tokens=1)


def test_per_layer_allocation_keeps_the_budget_and_bounds():
    shapes = [SMOL] * 6
    uni = LayerShape(6, 2, 768)
    widths = plan.per_layer_widths(from_stats(_stats(6), shapes), shapes, uni, round_to=32)
    assert sum(w.ffn_dim for w in widths) == 6 * 768
    assert sum(w.n_kv_head for w in widths) == 6 * 2
    assert all(384 <= w.ffn_dim <= 1536 and w.ffn_dim % 32 == 0 for w in widths)
    assert all(1 <= w.n_kv_head <= 3 and w.n_head == 3 * w.n_kv_head for w in widths)
    assert len({w.ffn_dim for w in widths}) > 1  # layers with concentrated energy get fewer channels
    # energy spread evenly (layer 0: uniform draws) keeps more than energy in few channels (layer 5: x^6)
    assert widths[0].ffn_dim > widths[5].ffn_dim


def test_select_keeps_heads_evenly_inside_kept_groups():
    stats = _stats(2)
    plans = plan.select(from_stats(stats, [SMOL] * 2), [SMOL] * 2, [LayerShape(4, 2, 64)] * 2)
    for p in plans:
        assert len(p.kv_heads) == 2 and len(p.heads) == 4 and len(p.channels) == 64
        assert [h // 3 for h in p.heads] == [g for g in p.kv_heads for _ in range(2)]
        assert p.heads == sorted(p.heads) and p.channels == sorted(p.channels)


def test_plan_composes_indices_in_source_numbering():
    lin = plan.Plan.dense([LayerShape(6, 2, 8)])
    lin.apply([plan.LayerPlan([1], [3, 5], [0, 2, 4, 6])])
    lin.apply([plan.LayerPlan([0], [1], [1, 3])])
    assert (lin.kv_heads, lin.heads, lin.channels) == ([[1]], [[5]], [[2, 6]])


def test_plan_round_trips_through_json_and_reads_the_first_format(tmp_path):
    kept = plan.Plan.dense([LayerShape(6, 2, 8)] * 3, {"model": "m", "model_type": "llama"}, {"seed": 3})
    kept.drop_layers([1])
    kept.apply([plan.LayerPlan([1], [3, 5], [0, 2]), plan.LayerPlan([0], [0], [7])])
    back = plan.Plan.from_json(json.loads(json.dumps(kept.to_json())))
    assert back == kept and back.dropped() == [1] and back.layers == [0, 2]
    assert [p.shape for p in back.layer_plans()] == [LayerShape(2, 1, 2), LayerShape(1, 1, 1)]
    old = {"format": "transact-edge/1", "source": {"model": "m", "path": "/m", "model_type": "llama"},
           "options": {"metric": "acts", "shots": 2, "seed": 0, "per_layer": False},
           "calibration": {"windows": 4}, "dense": {"layers": [LayerShape(6, 2, 8).as_dict()] * 2},
           "kept": {"kv_heads": [[0], [1]], "heads": [[0, 1], [3, 4]], "channels": [[1], [2]],
                    "numbering": "indices in the source model"}}
    (tmp_path / "transact.json").write_text(json.dumps(old))
    first = plan.Plan.load(tmp_path)  # a directory holding transact.json
    assert first.layers == [0, 1] and first.heads == [[0, 1], [3, 4]] and first.made["shots"] == 2
    first.check_source([LayerShape(6, 2, 8)] * 2, "x")
    with pytest.raises(UserError, match="made for 2 layers of 6 heads / 2 KV heads / MLP 8, this model has 3"):
        first.check_source([LayerShape(6, 2, 8)] * 3, "x")
    with pytest.raises(UserError, match="newer"):
        plan.Plan.from_json(kept.to_json() | {"version": 99})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a transact-edge plan"):
        plan.Plan.load(tmp_path / "bad.json")


def test_prune_replays_a_plan_on_a_sibling_checkpoint(tiny_llama_dir, tmp_path, tokenizer, capsys):
    """The base model's cut, applied to another checkpoint of the same shapes (an 'instruct sibling'),
    without calibration: the same kept indices, and the sibling's own weights at those indices."""
    from helpers import tiny_model

    from transact_edge.cli import main
    from transact_edge.loading import load
    from transact_edge.surgery import cut

    sibling = tmp_path / "sibling"
    tiny_model("llama", seed=7).save_pretrained(sibling)
    tokenizer.save_pretrained(sibling)
    base = ["--kv-heads", "1", "--mlp-ratio", "0.5", "--calib-samples", "2", "--seq-len", "32"]
    assert main(["prune", "--model", str(tiny_llama_dir), *base, "--drop-layers", "1", "--out", str(tmp_path / "a")]) == 0
    made = json.loads((tmp_path / "a" / "transact.json").read_text())
    assert made["format"] == "transact-edge/3" and made["plan"]["version"] == 1
    assert main(["prune", "--model", str(sibling), "--plan", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    replayed = json.loads((tmp_path / "b" / "transact.json").read_text())
    for key in ("kv_heads", "heads", "channels", "layers"):
        assert replayed["plan"][key] == made["plan"][key], key
    assert replayed["shots"][0]["replayed"] and "salience" not in replayed["shots"][0]
    assert replayed["replayed"]["made_from"] == str(tiny_llama_dir)
    # the sibling's weights, cut by hand at the plan's indices
    from transact_edge.depth import drop

    want = drop(load(str(sibling)).model, plan.Plan.from_json(made["plan"]).dropped())
    want = cut(want, plan.Plan.from_json(made["plan"]).layer_plans())
    got = load(str(tmp_path / "b")).model
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    # a plan of other shapes, or a plan next to widths, is one line and exit 2
    capsys.readouterr()
    assert main(["prune", "--model", str(tmp_path / "b"), "--plan", str(tmp_path / "a"), "--out", str(tmp_path / "c")]) == 2
    assert "the plan was made for 3 layers" in capsys.readouterr().err
    assert main(["prune", "--model", str(sibling), "--plan", str(tmp_path / "a"), "--kv-heads", "1",
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--plan fixes what is kept; drop widths" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_first_format_output_still_exports_inspects_and_replays(tiny_llama_dir, tmp_path, capsys):
    from transact_edge.cli import main

    assert main(["prune", "--model", str(tiny_llama_dir), "--kv-heads", "1", "--mlp-ratio", "0.5",
                 "--calib-samples", "2", "--seq-len", "32", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "transact.json").read_text())
    kept = {k: report["plan"][k] for k in ("kv_heads", "heads", "channels")} | {"numbering": "indices in the source model"}
    old = {k: v for k, v in report.items() if k != "plan"} | {"format": "transact-edge/1", "kept": kept}
    (tmp_path / "a" / "transact.json").write_text(json.dumps(old))
    assert main(["export", str(tmp_path / "a"), "--outtype", "f32", "--outfile", str(tmp_path / "a.gguf")]) == 0
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    assert main(["prune", "--model", str(tiny_llama_dir), "--plan", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "transact.json").read_text())["plan"]["heads"] == report["plan"]["heads"]
