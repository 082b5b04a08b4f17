"""Hostile and broken inputs, fuzzed (issue 15, item 3). Every reader of user files is handed mutated
valid files (tests/fuzzing.py) and must accept each or refuse it with one line; no case may grow the
address space past 1 GiB; NaN/Inf weights are refused through the CLI before any work, naming the tensor.

The normal suite runs fuzzing.DEFAULT_CASES (3,000 GGUF headers, 30-100 cases per other reader). The
figures in the README come from the soak
    TRANSACT_EDGE_FUZZ_CASES=1000 python -m pytest -m reliability -s tests/test_fuzz.py
(10,000 GGUF header cases and 1,000 per other reader), which writes benchmarks/results/reliability_fuzz.json.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuzzing import DEFAULT_CASES
from mutations import gguf_fields, kitchen_sink
from transact_edge.cli import main
from transact_edge.errors import UserError
from transact_edge.ggufmap import read_header

pytestmark = pytest.mark.reliability
CASES = os.environ.get("TRANSACT_EDGE_FUZZ_CASES")
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "reliability_fuzz.json"


def _expected(reader: str) -> int:
    return int(CASES) * (10 if reader == "gguf-header" else 1) if CASES else DEFAULT_CASES[reader]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict:
    """One fuzzing run (its tiny files built once, each reader's cases in a child forked from it), its summary."""
    work = tmp_path_factory.mktemp("fuzz")
    out = work / "summary.json"
    cmd = [sys.executable, str(Path(__file__).with_name("fuzzing.py")), "--work", str(work / "files"), "--json", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd + (["--cases", CASES] if CASES else []), env=env, capture_output=True, text=True,
                          timeout=7200)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(out.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    for r in summary["readers"]:
        print(f"{r['reader']:12s} {r['cases']:6d} cases: {r['accepted']} accepted, {r['refused']} refused, "
              f"{r['findings']} findings; slowest {r['slowest_case']['seconds']} s ({r['slowest_case']['ops']})")
    print(f"peak RSS {summary['peak_rss_mib']} MiB (after warm-up {summary['baseline_rss_mib']}); largest growth in "
          f"one case {max(r['largest_case_rss_growth']['mib'] for r in summary['readers'])} MiB; "
          f"{summary['wall_seconds']} s")
    if CASES:
        summary |= {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
                    "command": f"TRANSACT_EDGE_FUZZ_CASES={CASES} python -m pytest -m reliability -s tests/test_fuzz.py"}
        RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@pytest.mark.parametrize("reader", list(DEFAULT_CASES))
def test_every_case_is_accepted_or_refused_in_one_line(campaign, reader):
    r = next(r for r in campaign["readers"] if r["reader"] == reader)
    assert r["findings"] == 0, r["finding_cases"]
    assert r["cases"] == _expected(reader)
    assert r["accepted"] + r["refused"] == r["cases"]
    assert r["accepted"] > 0 and len(r["top_refusals"]) >= 3  # the mutations reach past the first check
    if reader.startswith("gguf"):
        assert r["past_magic"] > 0.8 * r["cases"]


def test_no_case_grows_memory_past_one_gib(campaign):
    assert campaign["cap_catches_allocations"]  # the address-space cap is live: a 1.25 GiB allocation failed
    assert campaign["peak_rss_mib"] - campaign["baseline_rss_mib"] < 1024
    for r in campaign["readers"]:  # each case's own peak above the RSS it started from
        assert 0 <= r["largest_case_rss_growth"]["mib"] < 1024, r["largest_case_rss_growth"]


@pytest.mark.parametrize("kind, says", [("count", "cannot fit"), ("length", "are left"), ("dim", "past the end")])
def test_a_size_of_2_to_the_60_is_refused_by_the_file_size(kind, says, tmp_path):
    """Every count, string length and tensor dimension of a GGUF header claiming 2^60 is refused by
    comparison with the bytes the file has: one line, no allocation (the peak RSS does not move)."""
    path = kitchen_sink(tmp_path / "k.gguf")
    data = path.read_bytes()
    spots = [off for off, width, k in gguf_fields(data)[0] if k == kind and width == 8]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for off in spots:
        path.write_bytes(data[:off] + (2**60).to_bytes(8, "little") + data[off + 8:])
        with pytest.raises(UserError, match=says) as e:
            read_header(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert len(spots) >= 3 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"])
def test_nan_or_inf_weights_are_refused_before_work(stream, tensor, tmp_path, tiny_llama_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    weights[tensor].view(-1)[5] = float("nan") if "layers" in tensor else float("inf")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(src), "--out", str(out), "--kv-heads", "1", "--calib-samples", "2",
               "--seq-len", "32", *(["--stream"] if stream else [])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"weight {tensor} holds NaN or Inf" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert torch.isnan(load_file(src / "model.safetensors")[tensor]).any() == ("layers" in tensor)  # input untouched
