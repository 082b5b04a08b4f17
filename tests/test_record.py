"""transact.json as a typed record: it round-trips, files of the earlier formats still read (two written by
the transact-edge/2 code, kept in tests/data), and `inspect --json` prints it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transact_edge import record
from transact_edge.errors import UserError
from transact_edge.record import Calibration, Record, Shot

DATA = Path(__file__).parent / "data"


def _made(tmp_path: Path) -> Record:
    """A record as a prune builds it: begin, shots, finish."""
    class Windows:  # the shape and numel of a (windows, seq_len) tensor, without torch
        shape = (4, 32)

        def numel(self) -> int:
            return 128

    layer = {"n_head": 6, "n_kv_head": 2, "ffn_dim": 128}
    dense = {"layers": [layer] * 2, "uniform": True, "head_dim": 16, "params": 1000, "kv_bytes_per_token_f16": 256}
    r = Record.begin({"model": "m", "shots": 1, "train_tokens": 64, "metric": "acts"}, "m", tmp_path, "llama",
                     Calibration.of("wiki", Windows()), dense)
    r.shots.append(Shot(1, widths=[layer | {"n_kv_head": 1}] * 2, salience_seconds=0.5,
                        recovery={"tokens": 64, "loss": "kd", "data": []}, extra={"future_key": [1, 2]}))
    r.recovery.generated = {"sampled_tokens": 64}
    r.evaluation.before = {"ppl": 10.0, "nll": 2.3, "window": 32, "stride": 32, "tokens": 96, "text": "t"}
    r.finish(dense | {"layers": [layer | {"n_kv_head": 1}] * 2, "params": 900}, {"version": 1, "heads": [[0]]},
             {"load": 1.0, "salience": 0.5})
    return r


def test_the_record_round_trips_through_its_file(tmp_path):
    r = _made(tmp_path)
    r.write(tmp_path)
    back = record.read(tmp_path)
    assert back == r and back.schema == record.SCHEMA == "transact-edge/3"
    on_disk = json.loads((tmp_path / record.FILE).read_text())
    # the keys of the earlier formats, which the benchmarks and committed results read
    assert on_disk["format"] == "transact-edge/3" and on_disk["pruned"]["params"] == 900
    assert on_disk["seconds"] == {"load": 1.0, "salience": 0.5} and on_disk["perplexity_before"]["ppl"] == 10.0
    assert on_disk["generated"] == {"sampled_tokens": 64} and on_disk["calibration"]["tokens"] == 128
    assert on_disk["shots"][0]["future_key"] == [1, 2] and "perplexity_after" not in on_disk
    assert r.made() == {"metric": "acts", "shots": 1, "seed": None, "per_layer": None, "drop_layers": None,
                        "calibration": {"windows": 4, "seq_len": 32, "tokens": 128, "corpus": "wiki"}}


@pytest.mark.parametrize("name", ["transact-edge-2.json", "transact-edge-2-streamed.json"])
def test_files_of_the_second_format_still_read(tmp_path, name):
    (tmp_path / record.FILE).write_bytes((DATA / name).read_bytes())
    old = json.loads((DATA / name).read_text())
    r = record.read(tmp_path)
    assert r.schema == "transact-edge/2" and r.source.model == old["source"]["model"]
    assert r.pruned.params == old["pruned"]["params"] < r.dense.params == old["dense"]["params"]
    assert r.calibration.tokens == old["calibration"]["tokens"] and r.plan == old["plan"]
    assert r.timings.seconds == old["seconds"] and r.to_json() == {"shots": [], **old}  # as written, nothing lost
    if "streamed" in name:  # the streamed prune's 6 hand-written options, no shots
        assert r.options["streamed"] and r.shots == [] and r.timings.peak_rss_mib == old["peak_rss_mib"]
    else:
        assert r.shots[1].recovery["tokens"] == old["shots"][1]["recovery"]["tokens"] > 0
        assert r.recovery.generated["sampled_tokens"] == old["generated"]["sampled_tokens"]


def test_a_first_format_file_reads_with_its_cut_as_a_plan(tmp_path):
    old = {"format": "transact-edge/1", "source": {"model": "m", "path": "/m", "model_type": "llama"},
           "options": {"metric": "acts", "shots": 2, "seed": 0, "per_layer": False},
           "calibration": {"windows": 4}, "dense": {"layers": [{"n_head": 6, "n_kv_head": 2, "ffn_dim": 8}] * 2},
           "kept": {"kv_heads": [[0], [1]], "heads": [[0, 1], [3, 4]], "channels": [[1], [2]]}}
    (tmp_path / record.FILE).write_text(json.dumps(old))
    r = record.read(tmp_path)
    assert r.plan["heads"] == [[0, 1], [3, 4]] and r.plan["layers"] == [0, 1] and r.plan["made"]["shots"] == 2


@pytest.mark.parametrize("text", ['{"format": "transact-edge/99", "source": {"model": "m"}, "options": {}}',
                                  '{"source": {"model": 3}, "options": {}}', '[1]', '{"source": "m"}', "not json"])
def test_what_is_not_a_record_is_one_line(tmp_path, text):
    (tmp_path / record.FILE).write_text(text)
    with pytest.raises(UserError, match="not a transact.json report"):
        record.read(tmp_path)


def test_inspect_json_prints_the_record(tiny_llama_dir, tmp_path, capsys):
    from transact_edge.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, ckpt)
    (ckpt / record.FILE).write_bytes((DATA / "transact-edge-2.json").read_bytes())
    r = record.read(ckpt)
    r.schema = record.SCHEMA
    r.write(ckpt)
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["record"]["format"] == "transact-edge/3" and info["record"] == r.to_json()
    assert info["record"]["pruned"]["params"] == r.pruned.params
    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "transact.json (transact-edge/3): pruned from" in text and "2 shot(s)" in text


def test_the_record_module_does_not_import_torch():
    code = "import sys, transact_edge.record; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
