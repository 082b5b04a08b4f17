"""Running the tests on a device: llama.cpp's own llama-bench where it is built for the device's
target, else the Python worker; the device's read bandwidth (membw) for the roofline; greedy text on
other devices compared with this machine's."""
from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transact_edge import llamabuild
from transact_edge.bench.facts import MIB, ModelFacts, facts
from transact_edge.bench.spec import Tests, test_name
from transact_edge.errors import UserError
from transact_edge.llamacpp import kv_from_log
from transact_edge.runtimes import RUNTIMES


@dataclass
class ModelRun:
    facts: ModelFacts
    backend: str
    results: list[dict]
    kv: dict | None
    peak_rss_mib: float | None
    rss_before_model_mib: float | None = None   # Python workers: what the interpreter held before loading
    greedy: dict | None = None                   # remote/emulated devices: same greedy text as here?
    rows: list[dict] = field(default_factory=list)


def _run_llama_bench(device, binary: Path, f: ModelFacts, tests: Tests, threads: int, reps: int) -> ModelRun:
    exe, model = device.put(binary), device.put(Path(f.path))
    argv = [exe, "-m", model, "-p", ",".join(map(str, tests.n_prompt)), "-n", ",".join(map(str, tests.n_gen)),
            "-d", ",".join(map(str, tests.depths)), "-t", str(threads), "-r", str(reps), "-o", "json", "-v"]
    for p, n in tests.pg:
        argv += ["-pg", f"{p},{n}"]
    res = device.run(argv)
    if res.rc:
        tail = [l for l in res.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit {res.rc}"]
        raise UserError(f"{device.name}: llama-bench failed on {f.name}: {tail[0]}")
    records = json.loads(res.stdout)
    results = [{"n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "n_depth": r.get("n_depth", 0),
                "samples_ts": r["samples_ts"]} for r in records]
    return ModelRun(f, "llama-bench", results, kv_from_log(res.stderr), res.peak_rss_mib)


def _run_worker(device, runtime: str, f: ModelFacts, tests: Tests, threads: int, reps: int) -> ModelRun:
    job = {"runtime": runtime, "model": f.path, "cases": tests.cases(), "threads": threads, "reps": reps,
           "vocab": f.vocab}
    res = device.run([sys.executable, "-m", "transact_edge.bench", json.dumps(job)])
    if res.rc:
        tail = [l for l in res.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit {res.rc}"]
        raise UserError(f"{runtime} failed on {f.name}: {tail[0]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    backend = "llama-cpp-python" if runtime == "llama.cpp" else runtime
    return ModelRun(f, backend, out["results"], out["kv"], res.peak_rss_mib, out["rss_before_model_mib"])


GREEDY_PROMPT = "The history of the city begins"


def greedy_text(device, model: ModelFacts, n: int, threads: int) -> str:
    """`n` greedy tokens (as text) after GREEDY_PROMPT, by llama.cpp's own llama-completion on the
    device, or by llama-cpp-python here when no native build exists."""
    binary = llamabuild.find(device.target, "llama-completion")
    if binary is None and device.name == "local":
        from transact_edge.llamacpp import open_gguf
        rt = open_gguf(Path(model.path), n_ctx=512, threads=threads, logits_all=False)
        out = rt.llm.create_completion(GREEDY_PROMPT, max_tokens=n, temperature=0.0, top_k=1, seed=0)
        return out["choices"][0]["text"]
    if binary is None:
        raise UserError(f"no llama-completion for {device.target}: run transact-edge build-llama --target {device.target}")
    res = device.run([device.put(binary), "-m", device.put(Path(model.path)), "-p", GREEDY_PROMPT, "-n", str(n),
                      "-no-cnv", "--temp", "0", "--top-k", "1", "-s", "0", "-c", "512", "-t", str(threads),
                      "--ignore-eos", "--no-display-prompt", "--no-warmup"])
    if res.rc:
        raise UserError(f"{device.name}: llama-completion failed on {model.name} (exit {res.rc})")
    return res.stdout.strip()


def bandwidth(device, threads: int) -> float:
    """Memory read bandwidth in GB/s from the membw probe (data/membw.c) run on the device."""
    probe = llamabuild.membw(device.target)
    if probe is None:
        raise UserError(f"no membw probe for {device.target}: run transact-edge build-llama --target {device.target}")
    res = device.run([device.put(probe), str(threads), "1024" if not device.emulated else "256", "5"])
    m = re.search(r"read_GBps ([\d.]+)", res.stdout)
    if res.rc or not m:
        raise UserError(f"{device.name}: the bandwidth probe failed: {res.stderr.strip()[-200:]}")
    return float(m[1])


@dataclass
class Report:
    device: str
    target: str
    emulated: bool
    threads: int
    bandwidth_gbps: float
    runs: list[ModelRun]
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def run(models: list[str], runtime: str, tests: Tests, threads: int | None, reps: int, device,
        profile=None, greedy: int = 32) -> Report:
    """Benchmark every model on `device`, each in its own process."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    if reps < 1:
        raise UserError("-r must be at least 1")
    cases = tests.cases()
    all_facts = [facts(m, runtime) for m in models]
    if profile and tests.max_ctx() > profile.n_ctx:
        raise UserError(f"the tests need a {tests.max_ctx()}-token context; the profile allows {profile.n_ctx}")
    if profile:
        for f in all_facts:
            need = (f.size_bytes + f.kv_bytes_per_token * tests.max_ctx()) / MIB
            if need > profile.mem_mib:
                raise UserError(f"{f.name} needs ~{need:.0f} MiB (weights + KV); the profile allows {profile.mem_mib}")
    threads = threads or (profile.threads if profile else None) or device.cpu_count()
    binary = llamabuild.find(device.target) if runtime == "llama.cpp" else None
    if binary is None and device.name != "local":
        raise UserError(f"{device.name} runs llama.cpp's own llama-bench only: "
                        f"run transact-edge build-llama --target {device.target}")
    bw = bandwidth(device, threads)
    runs = []
    for f in all_facts:
        print(f"[bench] {f.name} on {device.name} ({len(cases)} tests x {reps})", file=sys.stderr, flush=True)
        r = (_run_llama_bench(device, binary, f, tests, threads, reps) if binary
             else _run_worker(device, runtime, f, tests, threads, reps))
        r.results.sort(key=lambda x: (x["n_depth"], bool(x["n_prompt"]) and bool(x["n_gen"]), x["n_prompt"] == 0))
        r.rows = [_row(r, res, runtime, threads, bw, device.emulated) for res in r.results]
        if greedy and binary and device.name != "local":
            from transact_edge.devices import Local
            there, here = greedy_text(device, f, greedy, threads), greedy_text(Local(), f, greedy, threads)
            r.greedy = {"tokens": greedy, "identical": there == here, "device": there, "local": here}
        runs.append(r)
    return Report(device.name, device.target, device.emulated, threads, bw, runs)


def _row(r: ModelRun, res: dict, runtime: str, threads: int, bw: float, emulated: bool) -> dict:
    s = res["samples_ts"]
    p, n, d = res["n_prompt"], res["n_gen"], res["n_depth"]
    row = {"model": r.facts.name, "size_mib": r.facts.size_bytes / MIB, "params_m": r.facts.params / 1e6,
           "runtime": runtime, "backend": r.backend, "threads": threads, "test": test_name(p, n, d),
           "n_prompt": p, "n_gen": n, "n_depth": d, "ts_mean": statistics.fmean(s),
           "ts_sd": statistics.stdev(s) if len(s) > 1 else 0.0, "emulated": emulated,
           "roofline_ts": None, "roofline_share": None,
           "latency_ms": 1000 * (p + n) / statistics.fmean(s) if p and n else None}
    if n and not p:
        row["roofline_ts"] = bw * 1e9 / (r.facts.weight_bytes_per_token + d * r.facts.kv_bytes_per_token)
        row["roofline_share"] = row["ts_mean"] / row["roofline_ts"]
    return row
