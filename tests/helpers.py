"""What tests share besides fixtures (conftest.py holds those): the table of tiny random models, one per
supported family; and the fault campaigns' ways of running the CLI in a process, holding it inside a write
phase, killing it there and recording where the kills landed (test_reliability*.py)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from transact_edge.arch import FAMILIES
from transact_edge.checkpoint import HOLD

# One tiny config per supported family: GQA everywhere, biases where the family has them.
TINY = {
    "llama": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False),
}
COMMON = dict(hidden_size=96, head_dim=16, intermediate_size=128, num_hidden_layers=3, vocab_size=49152,
              max_position_embeddings=512)


# Llama 3.1's rope scaling on a short original context, so that 512 positions reach its scaled pairs
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_model(family: str, seed: int = 0, **overrides):
    cfg = getattr(transformers, FAMILIES[family].config_class)(**(COMMON | TINY[family] | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family].model_class)(cfg).eval()
    with torch.no_grad():  # spread the activations so that salience has something to rank
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.linspace(0.2, 3.0, p.shape[0])[:, None])
    return model


# ---------------------------------------------------------------- fault campaigns

KILLS = int(os.environ.get("TRANSACT_EDGE_KILLS", "2"))
CLI = [sys.executable, "-m", "transact_edge"]
# What a shell gives a command: SIGINT at its default, nothing blocked. A disposition of SIG_IGN survives exec and
# CPython then installs no KeyboardInterrupt handler, so a test process that inherited or set one (an xdist
# worker after some other test) would make Ctrl-C do nothing in the child: the SIGINT test's one failure.
AS_FROM_A_SHELL = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "signal.pthread_sigmask(signal.SIG_SETMASK, []); os.execv(sys.argv[1], sys.argv[1:])"]
TEMPORARY = re.compile(r"\..+\.(tmp|old)-[a-z0-9_]{8}(\.[a-z0-9]+)?")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reliability_kills.json"


def prune_args(src: Path, out: Path) -> list[str]:
    return ["prune", "--model", str(src), "--out", str(out), "--heads", "3", "--kv-heads", "1", "--mlp", "64",
            "--calib-samples", "4", "--seq-len", "64", "--batch-size", "2", "--shots", "2", "--train-tokens", "768",
            "--lr", "1e-3", "--device", "cpu", "--val-windows", "2", "--checkpoint-minutes", "0"]


def export_args(fmt: str, src: Path, out: Path) -> list[str]:
    return ["export", str(src), "--format", fmt, "--outfile", str(out)] + (["--outtype", "f16"] if fmt == "gguf" else [])


class Started(subprocess.Popen):
    """A process whose stderr goes to a file (a pipe nobody reads would block it once full)."""

    def stderr_text(self) -> str:
        with open(f"/proc/self/fd/{self.log.fileno()}") as log:  # its own offset: the child writes at the shared one
            return log.read()


def start(args: list[str], env: dict | None = None, **kw) -> Started:
    log = tempfile.TemporaryFile("w+")
    proc = Started(AS_FROM_A_SHELL + CLI + args, stdout=subprocess.DEVNULL, stderr=log, text=True,
                   env=(env or os.environ) | {"HF_HUB_OFFLINE": "1"}, **kw)
    proc.log = log
    return proc


def run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, env=(env or os.environ) | {"HF_HUB_OFFLINE": "1"},
                          **kw)


def one_error(stderr: str) -> str:
    """The run's single error line (progress bars may precede it on stderr); no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("transact-edge: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def leftovers(where: Path) -> list[str]:
    """Temporaries, locks and partial runs anywhere under `where`."""
    return sorted(str(p.relative_to(where)) for p in where.rglob(".*")
                  if TEMPORARY.fullmatch(p.name) or p.name.endswith((".lock", ".partial")))


def phase(out: Path) -> str:
    """Which write phase a run is in, from what it has on disk right now."""
    parent, partial = out.parent, out.parent / f".{out.name}.partial"
    if not parent.is_dir():
        return "before any write"
    if any(TEMPORARY.fullmatch(p.name) and p.name.startswith(f".{out.name}.") for p in parent.iterdir()):
        return "writing the output"
    if partial.is_dir():
        names = [p.name for p in partial.iterdir()]
        if any(TEMPORARY.fullmatch(n) for n in names):
            return "writing a checkpoint"
        return "recovery" if names else "between checkpoints"
    return "before any write" if not (parent / f".{out.name}.lock").exists() else "load, calibration, surgery"


def signal_bits(pid: int, field: str | None = None) -> int | dict[str, str]:
    """A process's signal masks from /proc (SigBlk, SigIgn, SigCgt): one as an int, or all as hex text."""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    masks = {k: status[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt")}
    return int(masks[field], 16) if field else masks


def held(proc: Started) -> None:
    """Wait until `proc` has stopped itself inside the publish that $TRANSACT_EDGE_HOLD_PUBLISH names."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"it ended before the held publish (status {status}): {proc.stderr_text()[-2000:]}"


def hold_at(during: str, out: Path) -> str:
    """The glob of the publish that `during` names: the output itself, or a checkpoint inside the partial run."""
    return {"writing the output": str(out), "writing a checkpoint": f"{out.parent}/.{out.name}.partial/*"}[during]


def kill_at(args: list[str], out: Path, rng: random.Random, horizon: float, during: str | None,
            env: dict | None = None) -> str:
    """SIGKILL a run of `args`: at a seeded moment within `horizon` s of its start, or (`during` a write
    phase) held inside that phase, its temporary written, the rename not yet done. Returns the phase it
    landed in, or 'finished' if it ended first (only a seeded moment can come too late)."""
    env = env or os.environ
    if during:
        proc = start(args, env=env | {HOLD: hold_at(during, out)})
        held(proc)
        landed = phase(out)
        assert landed == during, landed
        proc.kill()
        proc.wait()
        return landed
    proc, t0, when = start(args, env=env), time.monotonic(), rng.uniform(0.3, 1.0) * horizon
    while proc.poll() is None:
        if time.monotonic() - t0 >= when:
            landed = phase(out)
            proc.kill()
            proc.wait()
            return landed
        time.sleep(0.002)
    return "finished"


def digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def record_kills(target: str, landed: list[str]) -> None:
    """Where a campaign's kills landed, printed; written to RESULTS when it is the full campaign (KILLS >= 10)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    kills = sum(where != "finished" for where in landed)
    data[target] = {"kills": kills, "landed": dict(Counter(landed)), "date": time.strftime("%Y-%m-%d"),
                    "command": f"TRANSACT_EDGE_KILLS={KILLS} python -m pytest -m reliability "
                                   "tests/test_reliability.py tests/test_reliability_builds.py"}
    if KILLS >= 10:  # the campaign's figures, not the normal suite's short run
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\n{target}: {kills} kills landed in {dict(Counter(landed))}")
