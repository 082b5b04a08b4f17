"""Several processes: two gloo processes on the CPU must train exactly what one process trains.

Recovery is distillation from the dense model (the default): each process holds the teacher.

With the same windows, two processes at --batch-size 1 (DDP averages their gradients, FSDP2
reduce-scatters them) take the same steps as one process at --batch-size 2, and the activation
statistics summed over the processes are those of one process. So the checkpoints must agree.
Also: the launcher's failures, and a batch too large for the memory (a real limit, RLIMIT_AS).
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from transact_edge import distributed
from transact_edge.cli import main

PRUNE = ["prune", "--kv-heads", "1", "--heads", "3", "--mlp", "64", "--shots", "2", "--train-tokens", "768",
         "--calib-samples", "6", "--seq-len", "64", "--device", "cpu", "--lr", "1e-3"]


def _run(args: list[str], env: dict | None = None, limit: int | None = None) -> subprocess.CompletedProcess:
    def cap():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "transact_edge", *args], capture_output=True, text=True,
                          timeout=600, env=os.environ | (env or {}), preexec_fn=cap)


@pytest.mark.parametrize("launcher,sharding", [("accelerate", "ddp"), ("torchrun", "fsdp")])
def test_two_processes_train_what_one_process_trains(launcher, sharding, tiny_llama_dir, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*PRUNE, "--model", str(tiny_llama_dir), "--out", str(one), "--batch-size", "2"]) == 0
    r = _run([*PRUNE, "--model", str(tiny_llama_dir), "--out", str(two), "--batch-size", "1",
              "--launcher", launcher, "--processes", "2", "--sharding", sharding])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1  # process 0 speaks for both

    a, b = (json.loads((d / "transact.json").read_text()) for d in (one, two))
    assert b["distributed"] == {"processes": 2, "backend": "gloo", "sharding": sharding}
    assert a["plan"] == b["plan"]  # summed statistics: the same heads and channels
    for sa, sb in zip(a["shots"], b["shots"]):
        assert sb["recovery"]["processes"] == 2
        assert sb["recovery"]["loss"] == "kd" and sb["recovery"]["teacher"]["placement"].startswith("a frozen replica")
        assert sa["recovery"]["tokens"] == sb["recovery"]["tokens"] and sa["recovery"]["steps"] == sb["recovery"]["steps"]
    wa, wb = (load_file(d / "model.safetensors") for d in (one, two))
    assert wa.keys() == wb.keys()
    moved = max((wa[k] - load_file(tiny_llama_dir / "model.safetensors")[k]).abs().max().item()
                for k in wa if k.endswith("embed_tokens.weight"))
    assert moved > 2e-3  # training moved the weights 20x more than the agreement asked for below
    for k in wa:  # AdamW's g / sqrt(v) magnifies float rounding where gradients are ~0 (rare tokens' rows)
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-3, msg=k)
    assert not list(tmp_path.glob(".two*"))  # no partial or temporary directory left


def test_missing_launcher_is_one_line_exit_2(monkeypatch, tiny_llama_dir, tmp_path, capsys):
    name, install, args = distributed.LAUNCHERS["accelerate"]
    monkeypatch.setitem(distributed.LAUNCHERS, "accelerate", ("no_such_accelerate.commands.launch", install, args))
    code = main([*PRUNE, "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--launcher", "accelerate"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no_such_accelerate.commands.launch is not installed (pip install accelerate)" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,message", [
    (["--launcher", "mpirun"], "unknown --launcher 'mpirun'"),
    (["--launcher", "torchrun", "--sharding", "zero3"], "unknown --sharding 'zero3'"),
    (["--launcher", "torchrun", "--stream", "--shots", "1", "--train-tokens", "0"], "--stream runs in one process"),
])
def test_bad_launch_options(extra, message, tiny_llama_dir, tmp_path, capsys):
    code = main([*PRUNE, "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_strip_launch_flags():
    assert distributed.strip_launch_flags(["prune", "--launcher", "torchrun", "--processes=2", "--out", "x"]) == \
        ["prune", "--out", "x"]


def test_batch_too_large_names_the_largest_that_fits(tiny_llama_dir, tmp_path):
    """Under a 5 GiB address-space limit a batch of 8 x 512 tokens cannot train (the logits alone
    need ~3 GiB per 8 windows); the error names a smaller batch (4 here), and that batch then runs. The
    limit and the batch are kept low: each probe of the search trains a step, so larger ones only cost time."""
    args = ["prune", "--model", str(tiny_llama_dir), "--kv-heads", "1", "--mlp", "64", "--train-tokens", "16384",
            "--calib-samples", "4", "--seq-len", "512", "--device", "cpu"]
    r = _run([*args, "--out", str(tmp_path / "big"), "--batch-size", "8"], limit=5 << 30)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    m = re.search(r"recovery training: a batch of 8 windows x 512 tokens does not fit in cpu memory; "
                  r"the largest that fits is (\d+): rerun with --batch-size (\d+)", line)
    assert m and m[1] == m[2] and 1 <= int(m[1]) < 8, line
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big*"))
    one_step = ["--train-tokens", str(int(m[1]) * 512)]  # that batch runs: one step shows it
    r = _run([*args, *one_step, "--out", str(tmp_path / "fits"), "--batch-size", m[1]], limit=5 << 30)
    assert r.returncode == 0, r.stderr[-2000:]


def test_teacher_samples_under_a_launcher_are_made_once_and_shared(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Process 0 samples the `generated` source while the others wait, then every process reads its file;
    the run equals one process's."""
    from transact_edge import generate

    gen = ["--train-data", "wiki@1,generated@1", "--gen-tokens", "512", "--gen-len", "32"]
    monkeypatch.setattr(generate, "CACHE", tmp_path / "cache-one")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*PRUNE, *gen, "--model", str(tiny_llama_dir), "--out", str(one), "--batch-size", "2"]) == 0
    r = _run([*PRUNE, *gen, "--model", str(tiny_llama_dir), "--out", str(two), "--batch-size", "1",
              "--launcher", "torchrun", "--processes", "2"], env={"TRANSACT_EDGE_CACHE": str(tmp_path / "cache-two")})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((d / "transact.json").read_text()) for d in (one, two))
    assert a["generated"]["sampled_tokens"] == b["generated"]["sampled_tokens"] == 512
    assert len(list((tmp_path / "cache-two" / "generated").iterdir())) == 1
    wa, wb = (load_file(d / "model.safetensors") for d in (one, two))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-3, msg=k)
