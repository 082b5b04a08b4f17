"""Bad input: one line on stderr, exit status 2, nothing left under the output name, input untouched."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from transact_edge.cli import main
from transact_edge.loading import embedded_gguf


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def digest(path):
    if path.is_dir():
        return {p.name: digest(p) for p in sorted(path.iterdir())}
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture
def inputs(tmp_path, tiny_llama_dir):
    """Bad inputs of every kind, built under tmp_path."""
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    truncated = tmp_path / "truncated.gguf"
    with open(embedded_gguf("smollm2-135m"), "rb") as f:
        truncated.write_bytes(f.read(3_000_000))
    garbled = tmp_path / "garbled.gguf"
    garbled.write_bytes(os.urandom(4096))
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("   \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02" * 1000)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"txt": "no text field"}\n')
    return dict(tiny=tiny_llama_dir, empty_dir=empty_dir, gpt2=gpt2, pickled=pickled, truncated=truncated,
                garbled=garbled, empty_txt=empty_txt, binary=binary, bad_jsonl=bad_jsonl)


CASES = {
    "nonexistent path": ["--model", "{tmp}/does-not-exist"],
    "directory without config": ["--model", "{empty_dir}"],
    "unsupported architecture": ["--model", "{gpt2}"],
    "pickled weights only": ["--model", "{pickled}"],
    "truncated gguf": ["--model", "{truncated}"],
    "garbled gguf": ["--model", "{garbled}"],
    "ratio zero": ["--model", "{tiny}", "--mlp-ratio", "0"],
    "ratio above one": ["--model", "{tiny}", "--attn-ratio", "1.5"],
    "more kv heads than the model": ["--model", "{tiny}", "--kv-heads", "9"],
    "more channels than the model": ["--model", "{tiny}", "--mlp", "4096"],
    "heads not a multiple of kv heads": ["--model", "{tiny}", "--heads", "3", "--kv-heads", "2"],
    "empty calibration file": ["--model", "{tiny}", "--calib", "{empty_txt}"],
    "binary calibration file": ["--model", "{tiny}", "--calib", "{binary}"],
    "jsonl without text": ["--model", "{tiny}", "--calib", "{bad_jsonl}"],
    "missing calibration file": ["--model", "{tiny}", "--calib", "{tmp}/nope.txt"],
    "zero shots": ["--model", "{tiny}", "--shots", "0"],
    "unknown recovery loss": ["--model", "{tiny}", "--train-tokens", "64", "--recovery", "mse"],
    "zero kd temperature": ["--model", "{tiny}", "--train-tokens", "64", "--kd-temperature", "0"],
    "unknown schedule": ["--model", "{tiny}", "--train-tokens", "64", "--schedule", "cubic"],
    "missing train data": ["--model", "{tiny}", "--train-tokens", "64", "--train-data", "wiki@1,{tmp}/nope.jsonl@2"],
    "bad train data weight": ["--model", "{tiny}", "--train-tokens", "64", "--train-data", "wiki@zero"],
    "negative train data weight": ["--model", "{tiny}", "--train-tokens", "64", "--train-data", "wiki@-1"],
    "train data named twice": ["--model", "{tiny}", "--train-tokens", "64", "--train-data", "wiki,wiki@2"],
    "generated without gen tokens": ["--model", "{tiny}", "--train-tokens", "64", "--train-data", "generated"],
    "unknown gen cache": ["--model", "{tiny}", "--train-tokens", "64", "--train-data", "generated", "--gen-tokens", "64",
                          "--gen-cache", "paged"],
    "missing teacher": ["--model", "{tiny}", "--train-tokens", "64", "--teacher", "{tmp}/no-teacher"],
    "too many layers dropped": ["--model", "{tiny}", "--drop-layers", "3"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(case, inputs, tmp_path, capsys):
    names = {k: str(v) for k, v in inputs.items()} | {"tmp": str(tmp_path)}
    argv = [a.format(**names) for a in CASES[case]]
    before = {k: digest(v) for k, v in inputs.items()}
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", *argv, "--out", str(out), "--calib-samples", "2", "--seq-len", "32")
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("transact-edge: error:"), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary sibling left behind"
    assert {k: digest(v) for k, v in inputs.items()} == before, "input was modified"


def test_existing_output_needs_force(tmp_path, tiny_llama_dir, capsys):
    tiny_dir = tiny_llama_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "prune", "--model", str(tiny_dir), "--out", str(out), "--calib-samples", "2", "--seq-len", "32")
    assert rc == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"
    rc, _, err = run(capsys, "prune", "--model", str(tiny_dir), "--out", str(out), "--calib-samples", "2",
                     "--seq-len", "32", "--mlp-ratio", "0.5", "--force")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "transact.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tiny_models_prune_end_to_end(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    before = digest(tiny_dir)
    rc, stdout, err = run(capsys, "prune", "--model", str(tiny_dir), "--out", str(out), "--kv-heads", "1",
                          "--mlp-ratio", "0.5", "--shots", "2", "--calib-samples", "4", "--seq-len", "32",
                          "--train-tokens", "256", "--per-layer")
    assert rc == 0, err
    report = json.loads((out / "transact.json").read_text())
    assert [l["n_kv_head"] for l in report["pruned"]["layers"]] == [1, 1, 1]
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert len(report["shots"]) == 2 and report["shots"][1]["recovery"]["tokens"] > 0
    assert digest(tiny_dir) == before
    rc, stdout, err = run(capsys, "inspect", str(out))
    assert rc == 0 and "n_kv_head" in stdout


@pytest.mark.parametrize("metric", ["magnitude", "taylor", "random"])
def test_baseline_metrics_prune_end_to_end(metric, tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "prune", "--model", str(tiny_llama_dir), "--out", str(out), "--kv-heads", "1",
                          "--mlp-ratio", "0.5", "--shots", "2", "--calib-samples", "4", "--seq-len", "32",
                          "--metric", metric)
    assert rc == 0, err
    report = json.loads((out / "transact.json").read_text())
    assert report["options"]["metric"] == metric and report["shots"][0]["salience"][0]["metric"] == metric
    assert [l["n_kv_head"] for l in report["pruned"]["layers"]] == [1, 1, 1]


def test_unknown_metric_is_a_clear_error(tmp_path, tiny_llama_dir, capsys):
    rc, stdout, err = run(capsys, "prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"),
                          "--kv-heads", "1", "--metric", "fisher")
    assert rc == 2 and "unknown --metric" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_console_script_is_installed():
    out = subprocess.run(["transact-edge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("prune", "eval", "inspect", "demo"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "transact_edge", "inspect", "/nonexistent"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path, tiny_llama_dir):
    """0755 directories and 0644 files under umask 022 (mkdtemp's 0700 and mkstemp's 0600 would keep a
    llama.cpp server running as another user out), whatever the writer."""
    import os
    import stat

    from transact_edge.cli import main

    old = os.umask(0o022)
    try:
        assert main(["prune", "--model", str(tiny_llama_dir), "--kv-heads", "1", "--calib-samples", "2",
                     "--seq-len", "32", "--out", str(tmp_path / "p")]) == 0
        assert main(["export", str(tmp_path / "p"), "--outtype", "f16", "--outfile", str(tmp_path / "p.gguf")]) == 0
        assert main(["export", str(tmp_path / "p"), "--format", "onnx", "--outfile", str(tmp_path / "onnx")]) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "p") == 0o755 and mode(tmp_path / "p.gguf") == 0o644 and mode(tmp_path / "onnx") == 0o755
    assert {mode(f) for f in (tmp_path / "p").iterdir()} == {0o644}
    assert {mode(f) for f in (tmp_path / "onnx").iterdir()} == {0o644} and (tmp_path / "onnx" / "genai_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "p", "p.gguf"]  # no temporary left beside them


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """An embedded model split across three installed packages (as qwen2.5-coder-1.5b is across 22)."""
    from transact_edge import loading

    site = tmp_path / "site"
    parts = [os.urandom(1000 + n) for n in range(3)]
    for n, data in enumerate(parts, 1):
        (site / f"fake_part{n}" / "data").mkdir(parents=True)
        (site / f"fake_part{n}" / "__init__.py").write_text("")
        (site / f"fake_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(loading, "CACHE", tmp_path / "cache")
    entry = loading.Embedded("fake.gguf", ("fake_part1", "fake_part2", "fake_part3"), "pip install fake-part1..3",
                             part="data/part{n:02d}.bin", size=sum(map(len, parts)))
    monkeypatch.setitem(loading.EMBEDDED, "fake-split", entry)
    return site, b"".join(parts)


def test_split_embedded_model_is_joined_once_in_order(split_model):
    site, whole = split_model
    path = embedded_gguf("fake-split")
    assert path.read_bytes() == whole and path.stat().st_mode & 0o777 == 0o644
    (site / "fake_part2" / "data" / "part02.bin").unlink()  # joined already: the parts are not read again
    assert embedded_gguf("fake-split") == path


@pytest.mark.parametrize("damage", ["missing package", "missing part", "wrong size"])
def test_split_embedded_model_damaged_is_one_line(damage, split_model, capsys):
    import importlib
    import shutil

    from transact_edge import loading

    site, _ = split_model
    if damage == "missing package":
        shutil.rmtree(site / "fake_part3")
        importlib.invalidate_caches()  # the import system's directory listings must not remember it
    elif damage == "missing part":
        (site / "fake_part2" / "data" / "part02.bin").unlink()
    else:
        (site / "fake_part2" / "data" / "part02.bin").write_bytes(b"short")
    rc, out, err = run(capsys, "inspect", "fake-split")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("transact-edge: error: fake-split: "), err
    assert {"missing package": "fake_part3 is not installed (pip install fake-part1..3)",
            "missing part": "part02.bin is missing", "wrong size": "not 3,003"}[damage] in err
    assert not loading.CACHE.exists() or not any(loading.CACHE.iterdir())  # nothing half-joined left
