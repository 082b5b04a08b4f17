"""Layer-streamed pruning gives the in-memory path's statistics, kept indices and weights."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from transact_edge import corpus
from transact_edge.calibration import collect
from transact_edge.loading import load, resolve
from transact_edge.memory import own_peak_rss_mib
from transact_edge.plan import WidthRequest
from transact_edge.prune import PruneOptions, prune
from transact_edge.stream import collect_streamed, prune_streamed


def _weights(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize("per_layer", [False, True])
def test_streamed_prune_equals_in_memory(tiny_dir, tmp_path, per_layer):
    widths = WidthRequest(kv_heads=1, mlp_ratio=0.5)
    opts = PruneOptions(model=str(tiny_dir), out=tmp_path / "mem", widths=widths, per_layer=per_layer,
                        calib_samples=4, seq_len=32, batch_size=2)
    ref = prune(opts)
    windows = corpus.windows(corpus.stream(load(str(tiny_dir)).tokenizer, "wiki", "train"), 32, 4)
    before = own_peak_rss_mib()
    got = prune_streamed(tiny_dir, replace(opts, out=tmp_path / "streamed", stream=True), windows)
    for key in ("kv_heads", "heads", "channels"):
        assert got.plan[key] == ref.plan[key], key
    assert got.pruned == ref.pruned and got.calibration == ref.calibration and got.dense == ref.dense
    assert got.options == ref.options | {"stream": True}  # one shape: the resume fingerprint of both
    assert got.shots[0].row_lengths == ref.shots[0].row_lengths and got.plan["made"] == ref.plan["made"]
    a, b = _weights(tmp_path / "mem"), _weights(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    on_disk = json.loads((tmp_path / "streamed" / "transact.json").read_text())
    assert on_disk == json.loads(json.dumps(got.to_json())) and on_disk["format"] == "transact-edge/3"
    assert before <= got.timings.peak_rss_mib <= own_peak_rss_mib()  # this process's VmHWM while it ran
    assert got.timings.seconds["total"] >= got.timings.seconds["salience"]
    x = torch.randint(0, 1000, (1, 16))
    m1, m2 = load(str(tmp_path / "mem")).model, load(str(tmp_path / "streamed")).model
    assert torch.equal(m1(input_ids=x).logits, m2(input_ids=x).logits)


@pytest.mark.slow
def test_streamed_statistics_of_smollm2_equal_in_memory(smollm2):
    windows = corpus.windows(corpus.stream(smollm2.tokenizer, "wiki", "train"), 128, 4)
    ref = collect(smollm2.model, windows, batch_size=2)
    got = collect_streamed(resolve("smollm2-135m"), smollm2.model.config, windows, batch_size=2)
    for a, b in zip(ref.mha + ref.mlp, got.mha + got.mlp):
        assert torch.allclose(a, b, rtol=1e-6)


def test_stream_cli_and_its_limits(tiny_llama_dir, tmp_path, capsys):
    from transact_edge.cli import main

    base = ["prune", "--model", str(tiny_llama_dir), "--kv-heads", "1", "--mlp-ratio", "0.5", "--calib-samples", "2",
            "--seq-len", "32", "--stream"]
    assert main([*base, "--out", str(tmp_path / "ok")]) == 0
    assert load(str(tmp_path / "ok")).model.config.num_key_value_heads == 1
    for extra, needle in ((["--shots", "2"], "--shots"), (["--train-tokens", "64"], "--train-tokens"),
                          (["--metric", "taylor"], "--metric")):
        capsys.readouterr()
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0]
        assert not (tmp_path / "bad").exists()
