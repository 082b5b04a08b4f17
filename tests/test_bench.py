"""bench and build-llama: real llama.cpp tools, a real OpenSSH server on 127.0.0.1, arm64 under qemu.

The adb device is exercised with tests/adb_standin.py, an adb-compatible stand-in that runs the
commands on this machine (clearly not a phone): no Android device can be attached here.
"""
from __future__ import annotations

import getpass
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from transact_edge import llamabuild
from transact_edge.cli import main
from transact_edge.exporters.gguf import GGUFExportOptions, export

SCRATCH = "/tmp/transact-edge.*"   # what the ssh device stages on the (local) board


@pytest.fixture(scope="module")
def builds():
    """llama.cpp's tools for this machine and for aarch64 (cached: the README builds them first)."""
    return {t: llamabuild.build(t) for t in ("native", "aarch64-linux-gnu")}


@pytest.fixture(scope="module")
def ggufs(pruned_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ggufs")
    return {"dense": export(GGUFExportOptions("smollm2-135m", "q8_0", out / "dense-q8_0.gguf")),
            "per_layer": export(GGUFExportOptions(str(pruned_dirs["per_layer"]), "q8_0", out / "pruned-q8_0.gguf"))}


def _bench(capsys, *argv) -> tuple[int, dict | str]:
    rc = main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and "json" in argv else out if rc == 0 else err)


def _error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if not l.startswith("[")]
    assert len(lines) == 1, err
    return lines[0]


def _check_kv(report: dict) -> None:
    for m in report["models"]:
        assert m["kv_ctx"] and abs(m["kv_mib_llama_cpp"] - m["kv_mib_per_layer_sum"]) < 0.006, m


def test_local_llama_bench_dense_vs_pruned(builds, ggufs, capsys):
    rc, rep = _bench(capsys, ggufs["dense"], ggufs["per_layer"], "-p", "32", "-n", "8", "-d", "0,64", "-r", "2",
                     "-o", "json")
    assert rc == 0, rep
    assert rep["device"] == "local" and rep["bandwidth_gbps"] > 0.1
    assert [r["test"] for r in rep["rows"][:4]] == ["pp32", "tg8", "pp32 @ d64", "tg8 @ d64"]
    assert all(r["backend"] == "llama-bench" and r["ts_mean"] > 0 for r in rep["rows"])
    tg = [r for r in rep["rows"] if r["n_gen"]]
    assert all(0 < r["roofline_share"] < 2 for r in tg)
    _check_kv(rep)
    dense, pruned = rep["models"]
    assert pruned["kv_mib_llama_cpp"] < dense["kv_mib_llama_cpp"]
    assert pruned["weight_bytes_per_token"] < dense["weight_bytes_per_token"]
    assert all(m["peak_rss_mib"] > 50 for m in rep["models"])


def test_llama_cpp_python_fallback_and_other_runtimes(ggufs, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSACT_EDGE_BUILDS", str(tmp_path / "no-builds"))
    rc, rep = _bench(capsys, ggufs["per_layer"], "-p", "16", "-n", "4", "-pg", "8,4", "-r", "2", "-o", "json")
    assert rc == 0, rep
    assert {r["backend"] for r in rep["rows"]} == {"llama-cpp-python"}
    assert [r["test"] for r in rep["rows"]] == ["pp16", "tg4", "pp8+tg4"] and rep["rows"][2]["latency_ms"] > 0
    _check_kv(rep)
    rc, rep = _bench(capsys, tiny_llama_dir, "--runtime", "torch", "-p", "16", "-n", "4", "-d", "0,8", "-r", "2",
                     "-o", "json")
    assert rc == 0, rep
    assert len(rep["rows"]) == 4 and all(r["backend"] == "torch" and r["ts_mean"] > 0 for r in rep["rows"])
    from transact_edge.exporters.onnx import ONNXExportOptions, export

    graph = export(ONNXExportOptions(str(tiny_llama_dir), tmp_path / "genai"))
    capsys.readouterr()  # the exporter's own progress lines
    for runtime, model in (("onnxruntime", graph), ("onnxruntime-genai", graph.parent)):
        rc, rep = _bench(capsys, model, "--runtime", runtime, "-p", "16", "-n", "4", "-d", "0,8", "-r", "2",
                         "-o", "json")
        assert rc == 0, rep
        assert len(rep["rows"]) == 4 and all(r["backend"] == runtime and r["ts_mean"] > 0 for r in rep["rows"])


def test_markdown_and_csv(ggufs, builds, capsys):
    rc, md = _bench(capsys, ggufs["per_layer"], "-p", "16", "-n", "4", "-r", "1")
    assert rc == 0 and "| pruned-q8_0 |" in md and "tg4" in md and "KV MiB (llama.cpp)" in md
    rc, text = _bench(capsys, ggufs["per_layer"], "-p", "16", "-n", "4", "-r", "1", "-o", "csv")
    assert rc == 0 and text.splitlines()[0].startswith("model,") and len(text.splitlines()) == 3


@pytest.mark.parametrize("argv, needle", [
    (["-p", "abc"], "bad -p"),
    (["-d", "-1"], "bad -d"),
    (["-p", "0", "-n", "0"], "no test"),
    (["-pg", "64"], "bad -pg"),
    (["--device", "bluetooth://x"], "unknown device"),
    (["--profile", "toaster"], "unknown profile"),
    (["--profile", "phone-midrange", "-d", "4096"], "context"),
    (["--runtime", "tensorflow"], "unknown runtime"),
    (["-o", "xml"], "output format"),
])
def test_bad_bench_input(ggufs, argv, needle, capsys):
    rc, err = _bench(capsys, ggufs["per_layer"], *argv)
    assert rc == 2 and needle in _error_line(err), err


def test_missing_model_and_bad_build_target(tmp_path, capsys):
    rc, err = _bench(capsys, tmp_path / "nope.gguf")
    assert rc == 2 and "not found" in _error_line(err)
    assert main(["build-llama", "--target", "riscv"]) == 2
    assert "unknown target" in _error_line(capsys.readouterr().err)
    assert main(["build-llama", "--target", "android-arm64", "--ndk", str(tmp_path)]) == 2
    assert "NDK" in _error_line(capsys.readouterr().err)


# ---- ssh: a real OpenSSH server on 127.0.0.1 ----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    sshd = shutil.which("sshd", path=f"/usr/sbin:/usr/local/sbin:{os.environ['PATH']}")
    assert sshd, "openssh-server is not installed (apt-get install openssh-server)"
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key", "wrong_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "log", "w"))
    for _ in range(600):  # up to a minute: a loaded machine starts it slowly
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, (d / "log").read_text()
        time.sleep(0.1)
    else:
        pytest.fail(f"sshd did not start: {(d / 'log').read_text()}")
    known = f"UserKnownHostsFile={d}/known_hosts"
    yield SimpleNamespace(
        spec=f"ssh://{getpass.getuser()}@127.0.0.1:{port}", port=port,
        options=["--ssh-option", f"IdentityFile={d}/user_key", "--ssh-option", known,
                 "--ssh-option", "StrictHostKeyChecking=accept-new", "--ssh-option", "IdentitiesOnly=yes"],
        wrong=["--ssh-option", f"IdentityFile={d}/wrong_key", "--ssh-option", known,
               "--ssh-option", "StrictHostKeyChecking=accept-new", "--ssh-option", "IdentitiesOnly=yes"])
    proc.terminate()
    proc.wait()


def test_ssh_device_runs_llama_bench_and_cleans_up(sshd, builds, ggufs, capsys):
    before = set(glob.glob(SCRATCH))
    rc, rep = _bench(capsys, ggufs["per_layer"], "--device", sshd.spec, *sshd.options, "-p", "16", "-n", "4",
                     "-r", "2", "--greedy", "16", "-o", "json")
    assert rc == 0, rep
    assert rep["device"].startswith("ssh://") and rep["target"] == "native"
    assert all(r["backend"] == "llama-bench" and r["ts_mean"] > 0 for r in rep["rows"])
    _check_kv(rep)
    (m,) = rep["models"]
    assert m["peak_rss_mib"] and m["peak_rss_mib"] > 50       # measured on the "board" from /proc VmHWM
    assert m["greedy"]["identical"] and m["greedy"]["device"]
    assert set(glob.glob(SCRATCH)) == before                   # nothing left behind


@pytest.mark.parametrize("case", ["wrong_key", "closed_port", "bad_model_on_board"])
def test_ssh_bad_input(case, sshd, builds, ggufs, tmp_path, capsys):
    before = set(glob.glob(SCRATCH))
    if case == "wrong_key":
        argv = [ggufs["per_layer"], "--device", sshd.spec, *sshd.wrong]
    elif case == "closed_port":
        argv = [ggufs["per_layer"], "--device", f"ssh://{getpass.getuser()}@127.0.0.1:{_free_port()}", *sshd.options]
    else:  # a file llama.cpp cannot load: staged, fails there, cleaned up
        bad = tmp_path / "broken.gguf"
        bad.write_bytes(Path(ggufs["per_layer"]).read_bytes()[:4096])
        argv = [bad, "--device", sshd.spec, *sshd.options, "--greedy", "0"]
    rc, err = _bench(capsys, *argv, "-p", "8", "-n", "2", "-r", "1")
    assert rc == 2, err
    assert _error_line(err).startswith("transact-edge: error:")
    assert set(glob.glob(SCRATCH)) == before


# ---- qemu-arm64 and the adb stand-in -----------------------------------------------------------

def test_qemu_arm64_same_greedy_tokens_as_x86(builds, ggufs, capsys):
    rc, rep = _bench(capsys, ggufs["per_layer"], "--device", "qemu-arm64", "-p", "8", "-n", "2", "-r", "1",
                     "--greedy", "16", "-o", "json")
    assert rc == 0, rep
    assert rep["emulated"] and rep["target"] == "aarch64-linux-gnu"
    (m,) = rep["models"]
    assert m["greedy"]["identical"], m["greedy"]
    _check_kv(rep)


def test_qemu_missing_is_a_clear_error(ggufs, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    rc, err = _bench(capsys, ggufs["per_layer"], "--device", "qemu-arm64")
    assert rc == 2 and "qemu-aarch64 not found" in _error_line(err)


def test_adb_standin(builds, ggufs, tmp_path, monkeypatch, capsys):
    root = tmp_path / "phone"
    (root / "data/local/tmp").mkdir(parents=True)
    monkeypatch.setenv("ADB", str(Path(__file__).parent / "adb_standin.py"))
    monkeypatch.setenv("ADB_STANDIN_ROOT", str(root))
    rc, rep = _bench(capsys, ggufs["per_layer"], "--device", "adb:standin-1", "--target", "native", "-p", "16",
                     "-n", "4", "-r", "1", "--greedy", "8", "-o", "json")
    assert rc == 0, rep
    assert rep["device"] == "adb:standin-1" and rep["models"][0]["greedy"]["identical"]
    assert list((root / "data/local/tmp").iterdir()) == []          # cleaned up
    rc, err = _bench(capsys, ggufs["per_layer"], "--device", "adb:R58M123")
    assert rc == 2 and "no adb device" in _error_line(err)
    monkeypatch.setenv("ADB", "/nonexistent/adb")
    rc, err = _bench(capsys, ggufs["per_layer"], "--device", "adb")
    assert rc == 2 and "adb not found" in _error_line(err)
