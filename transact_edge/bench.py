"""transact-edge bench: llama-bench-style speed, KV-cache memory, peak memory and roofline share.

Tests follow llama-bench: for each depth d, `ppP` times a P-token prompt and `tgN` times N
single-token decode steps, both after d tokens already in the KV cache (d is filled untimed).
Each model runs in its own process (llama.cpp's `llama-bench` when `build-llama` has built it for
the device's target, else a Python worker over llama-cpp-python, onnxruntime or torch), so peak
RSS is that process's own. The roofline for tg is the device's measured read bandwidth divided
by the bytes a token reads: every weight once (the token embedding only as the output head when
it is tied) plus depth x KV bytes per token.
"""
from __future__ import annotations

import csv
import io
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from transact_edge import llamabuild
from transact_edge.memory import own_peak_rss_mib
from transact_edge.errors import UserError
from transact_edge.ggufmap import read_header

MIB = 1024 * 1024
RUNTIMES = ("llama.cpp", "onnxruntime", "torch")


# ---- tests ---------------------------------------------------------------------------------------

def int_list(text: str, what: str) -> list[int]:
    """'512' or '0,1024,4096' -> [ints >= 0]; anything else is a bad test spec."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise UserError(f"bad {what} {text!r}: expected comma-separated integers >= 0, e.g. 0,4096")
    return values


def pair(text: str) -> tuple[int, int]:
    """'256,64' -> (256, 64): a prompt-then-generate test (llama-bench's -pg)."""
    values = int_list(text, "-pg")
    if len(values) != 2 or 0 in values:
        raise UserError(f"bad -pg {text!r}: expected PROMPT,GEN with both > 0, e.g. 256,64")
    return values[0], values[1]


@dataclass(frozen=True)
class Tests:
    n_prompt: list[int]
    n_gen: list[int]
    depths: list[int]
    pg: list[tuple[int, int]] = field(default_factory=list)

    def cases(self) -> list[tuple[int, int, int]]:
        """(prompt, gen, depth) like llama-bench: pp tests, tg tests, then pp+tg tests, per depth."""
        out = [(p, 0, d) for d in self.depths for p in self.n_prompt if p > 0]
        out += [(0, n, d) for d in self.depths for n in self.n_gen if n > 0]
        out += [(p, n, d) for d in self.depths for p, n in self.pg]
        if not out:
            raise UserError("no test to run: -p and -n are both 0")
        return sorted(out, key=lambda c: c[2])

    def max_ctx(self) -> int:
        return max(p + n + d for p, n, d in self.cases())


def test_name(p: int, n: int, d: int) -> str:
    return ("+".join(([f"pp{p}"] if p else []) + ([f"tg{n}"] if n else []))) + (f" @ d{d}" if d else "")


# ---- what a model reads per token ----------------------------------------------------------------

@dataclass
class ModelFacts:
    path: str
    name: str
    size_bytes: int                 # weights as stored
    params: int
    weight_bytes_per_token: int     # read once per decoded token
    kv_bytes_per_token: int         # K+V over all layers, in the runtime's cache type
    vocab: int


def gguf_facts(path: Path) -> ModelFacts:
    try:
        kv, tensors = read_header(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    import gguf

    meta = {k: v for k, v, *_ in kv}
    arch = meta["general.architecture"]
    n_layer = meta[f"{arch}.block_count"]

    def per_layer(key: str, default=None) -> list[int]:
        v = meta.get(f"{arch}.{key}", default)
        return list(v) if isinstance(v, list) else [v] * n_layer

    n_head = per_layer("attention.head_count")
    n_kv = per_layer("attention.head_count_kv", meta[f"{arch}.attention.head_count"])
    hd_default = meta[f"{arch}.embedding_length"] // max(n_head)
    k_len = meta.get(f"{arch}.attention.key_length", hd_default)
    v_len = meta.get(f"{arch}.attention.value_length", hd_default)
    nbytes, params, vocab = {}, 0, 0
    for name, shape, ttype in tensors:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        n = int(np.prod(shape))
        nbytes[name], params = n // block * size, params + n
        if name == "token_embd.weight":
            vocab = int(shape[1])
    read = sum(nbytes.values())
    if "output.weight" in nbytes:  # untied: the embedding contributes one row per token
        read -= nbytes["token_embd.weight"] - nbytes["token_embd.weight"] // vocab
    return ModelFacts(str(path), path.stem, sum(nbytes.values()), params, read,
                      sum(h * (k_len + v_len) for h in n_kv) * 2, vocab)   # f16 K and V: llama.cpp's default


def onnx_facts(path: Path) -> ModelFacts:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises DecodeError and friends
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    sizes, params = {}, 0
    for t in graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        params += n
        sizes[t.name] = n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    users: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    read = sum(sizes.values())
    vocab = 0
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in sizes:
            emb = next(t for t in graph.initializer if t.name == node.input[0])
            vocab = max(vocab, int(emb.dims[0]))
            if users[node.input[0]] == 1:  # only gathered: one row per token
                read -= sizes[node.input[0]] - sizes[node.input[0]] // int(emb.dims[0])
    kv = 0
    for i in graph.input:
        if i.name.startswith("past_key_values."):
            dims = i.type.tensor_type.shape.dim
            kv += dims[1].dim_value * dims[3].dim_value * \
                onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).itemsize
    return ModelFacts(str(path), path.stem, sum(sizes.values()), params, read, kv, vocab)


def torch_facts(source: str) -> ModelFacts:
    from transact_edge.loading import read_config, resolve
    from transact_edge.shapes import head_dim, kv_bytes_per_token, layer_shapes

    config = read_config(source)
    path = resolve(source)
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = layer_shapes(config)
    attn = sum(s.n_head * head_dim(config) * hidden * 2 + s.n_kv_head * head_dim(config) * hidden * 2 for s in shapes)
    mlp = sum(3 * s.ffn_dim * hidden for s in shapes)
    norms = (2 * len(shapes) + 1) * hidden
    tied = getattr(config, "tie_word_embeddings", False)
    params = attn + mlp + norms + vocab * hidden * (1 if tied else 2)
    read = 4 * (attn + mlp + norms + vocab * hidden + (0 if tied else hidden))
    return ModelFacts(str(path), Path(path).name, 4 * params, params, read,
                      kv_bytes_per_token(shapes, head_dim(config), 4), vocab)


FACTS = {"llama.cpp": gguf_facts, "onnxruntime": onnx_facts}


def facts(model: str, runtime: str) -> ModelFacts:
    if runtime == "torch":
        return torch_facts(model)
    path = Path(model)
    if not path.is_file():
        raise UserError(f"model file not found: {model}")
    return FACTS[runtime](path)


# ---- in-process measurement (the worker) ---------------------------------------------------------

class _LlamaCpp:
    def __init__(self, path: str, n_ctx: int, threads: int):
        from transact_edge.llamacpp import open_gguf
        self.rt = open_gguf(Path(path), n_ctx=n_ctx, threads=threads, logits_all=False)
        self.kv = self.rt.kv_cache()

    def eval(self, tokens: np.ndarray) -> None:
        self.rt.llm.eval(tokens.tolist())

    def truncate(self, n: int) -> None:
        self.rt.llm.n_tokens = n  # the next eval drops the cells from n on


class _Ort:
    kv = None

    def __init__(self, path: str, n_ctx: int, threads: int):
        from transact_edge.ortruntime import OrtModel
        self.model = OrtModel(Path(path), threads)
        self.past = self.model.empty_past(1)

    def eval(self, tokens: np.ndarray) -> None:
        _, self.past = self.model.forward(tokens[None], self.past)

    def truncate(self, n: int) -> None:
        self.past = {k: v[:, :, :n] for k, v in self.past.items()}


class _Torch:
    kv = None

    def __init__(self, source: str, n_ctx: int, threads: int):
        import torch
        from transformers import DynamicCache

        from transact_edge.loading import load
        torch.set_num_threads(threads)
        self.torch, self.model, self.empty = torch, load(source).model.eval(), DynamicCache
        self.cache = DynamicCache()

    def eval(self, tokens: np.ndarray) -> None:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(tokens)[None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values

    def truncate(self, n: int) -> None:
        drop = self.cache.get_seq_length() - n
        if n == 0:
            self.cache = self.empty()
        elif drop > 0:
            self.cache.crop(-drop)  # transformers 5 crops by a negative count


SESSIONS = {"llama.cpp": _LlamaCpp, "onnxruntime": _Ort, "torch": _Torch}


def measure(runtime: str, model: str, cases: list[tuple[int, int, int]], threads: int, reps: int,
            vocab: int, seed: int = 0) -> dict:
    """Tokens/s samples per case, in this process. Random tokens, as llama-bench uses."""
    n_ctx = max(p + n + d for p, n, d in cases)
    before = own_peak_rss_mib()  # the interpreter and its imports
    session = SESSIONS[runtime](model, n_ctx, threads)
    rng = np.random.default_rng(seed)
    session.eval(rng.integers(vocab, size=1))  # warm-up
    prefix = rng.integers(vocab, size=max(d for _, _, d in cases))
    filled, results = -1, []
    for p, n, d in cases:
        if d != filled:
            session.truncate(0)
            if d:
                session.eval(prefix[:d])
            filled = d
        samples = []
        for _ in range(reps):
            session.truncate(d)
            tokens = rng.integers(vocab, size=p + n)
            start = time.perf_counter()
            if p:
                session.eval(tokens[:p])
            for i in range(n):
                session.eval(tokens[p + i:p + i + 1])
            samples.append((p + n) / (time.perf_counter() - start))
        results.append({"n_prompt": p, "n_gen": n, "n_depth": d, "samples_ts": samples})
    return {"results": results, "kv": session.kv, "rss_before_model_mib": before}


# ---- running on a device -------------------------------------------------------------------------

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


def _kv_from_log(text: str) -> dict | None:
    from transact_edge.llamacpp import KV_LINE
    found = [m for m in KV_LINE.finditer(text)]
    if not found:
        return None
    m = max(found, key=lambda m: int(m[2]))
    return {"mib": float(m[1]), "cells": int(m[2]), "k_type": m[3], "v_type": m[5]}


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
    return ModelRun(f, "llama-bench", results, _kv_from_log(res.stderr), res.peak_rss_mib)


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


def summary(r: ModelRun) -> dict:
    """Per model: KV cache as llama.cpp reported it vs the per-layer sum, peak RSS, bytes per token."""
    out = {"model": r.facts.name, "backend": r.backend, "peak_rss_mib": r.peak_rss_mib, "greedy": r.greedy,
           "rss_before_model_mib": r.rss_before_model_mib,
           "weight_bytes_per_token": r.facts.weight_bytes_per_token, "kv_bytes_per_token": r.facts.kv_bytes_per_token,
           "kv_ctx": None, "kv_mib_llama_cpp": None, "kv_mib_per_layer_sum": None}
    if r.kv:
        out["kv_ctx"] = r.kv["cells"]
        out["kv_mib_llama_cpp"] = r.kv["mib"]
        out["kv_mib_per_layer_sum"] = r.facts.kv_bytes_per_token * r.kv["cells"] / MIB
    return out


# ---- output --------------------------------------------------------------------------------------

def render(report: Report, fmt: str) -> str:
    rows = [row for r in report.runs for row in r.rows]
    sums = [summary(r) for r in report.runs]
    if fmt == "json":
        return json.dumps({**{k: v for k, v in asdict(report).items() if k != "runs"},
                           "models": sums, "rows": rows}, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        by_model = {s["model"]: s for s in sums}
        w = csv.DictWriter(buf, fieldnames=[*rows[0], *[k for k in sums[0] if k not in rows[0]]])
        w.writeheader()
        for row in rows:
            w.writerow({**by_model[row["model"]], **row})
        return buf.getvalue()
    label = " (emulated: qemu-user, times are not the hardware's)" if report.emulated else ""
    lines = [f"device {report.device} [{report.target}]{label}, {report.threads} threads, "
             f"read bandwidth {report.bandwidth_gbps:.1f} GB/s (membw), {report.date}", "",
             "| model | size | params | backend | threads | test | t/s | roofline t/s | of roofline |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["latency_ms"]:
            continue
        roof = (f"{row['roofline_ts']:.1f} | {100 * row['roofline_share']:.0f}%" if row["roofline_ts"] else "- | -")
        lines.append(f"| {row['model']} | {row['size_mib']:.1f} MiB | {row['params_m']:.2f} M | {row['backend']} | "
                     f"{row['threads']} | {row['test']} | {row['ts_mean']:.2f} ± {row['ts_sd']:.2f} | {roof} |")
    latency = [row for row in rows if row["latency_ms"]]
    if latency:
        lines += ["", "| model | prefix + decode | latency ms | t/s |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['model']} | {r['test']} | {r['latency_ms']:.0f} | {r['ts_mean']:.2f} ± {r['ts_sd']:.2f} |"
                  for r in latency]
    lines += ["", "| model | KV MiB (llama.cpp) | per-layer sum MiB | @ ctx | KV bytes/token | weight bytes/token | "
                  "peak RSS MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sums:
        kv = (f"{s['kv_mib_llama_cpp']:.2f} | {s['kv_mib_per_layer_sum']:.2f} | {s['kv_ctx']}"
              if s["kv_ctx"] else "- | - | -")
        rss = f"{s['peak_rss_mib']:.0f}" if s["peak_rss_mib"] else "-"
        if s["rss_before_model_mib"]:
            rss += f" ({s['rss_before_model_mib']:.0f} before loading)"
        lines.append(f"| {s['model']} | {kv} | {s['kv_bytes_per_token']:,} | {s['weight_bytes_per_token']:,} | {rss} |")
    for r in report.runs:
        if r.greedy:
            verdict = "identical to" if r.greedy["identical"] else "DIFFERENT from"
            lines.append(f"\n{r.facts.name}: {r.greedy['tokens']} greedy tokens on {report.device} {verdict} this "
                         f"machine's: {r.greedy['device'][:80]!r}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the per-model worker: one JSON job in argv, one JSON line out
    job = json.loads(sys.argv[1])
    out = measure(job["runtime"], job["model"], [tuple(c) for c in job["cases"]], job["threads"], job["reps"],
                  job["vocab"])
    print(json.dumps(out))
