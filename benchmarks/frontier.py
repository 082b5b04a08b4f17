"""The frontier (issue 12): GGUF bytes vs perplexity scored by llama.cpp, for pruned points and the
baselines a user would reach for instead (the dense model at every type, depth pruning).

    python benchmarks/frontier.py point tx50-kd [--second-text lee_background.cor]   # one point, end to end
    python benchmarks/frontier.py prune tx50-kd tx75-kd   # only the pruned models, while `point` scores the done ones
    python benchmarks/frontier.py throughput --random-weights   # sampling new tok/s; KD vs LM step tok/s (GPU)
    python benchmarks/frontier.py speed             # decode tok/s of every shape x type on this host, one run
    python benchmarks/frontier.py report            # markdown table + plot with the Pareto front

A point prunes SmolLM2-135M (prune(): 128 x 1024 calibration tokens, batch 32 x 1024, AdamW, bf16
on a GPU), exports F16 GGUF with our exporter, makes every other type with llama.cpp's own
llama-quantize from it, and scores each file with llama.cpp's llama-perplexity (-c 512, the first
--chunks chunks; llama-perplexity scores the second half of each chunk) on the shipped held-out
Wikipedia pages and on a second text of another domain that recovery never sees (the Lee news
corpus, `lee_background.cor` in the gensim wheel), plus decode speed (llama-bench -n 64) on the
host's CPU. Points `dense` and `depthNN-llama` are the baselines: the dense model, and layers
removed by `llama-quantize --prune-layers` (no recovery; the layers ShortGPT's block influence
picks). Each row (point x type) is appended to benchmarks/results/frontier.jsonl as it is
measured; a point already there is skipped, so the study resumes point by point on short GPU slots.
K-quants are left out: they need rows divisible by 256 and SmolLM2's rows are 576 wide.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]  # the default; any llama-quantize type, +imatrix, +emb
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5,
               max_position_embeddings=8192, eos_token_id=2, torch_dtype="bfloat16")
CALIB = dict(calib_samples=128, seq_len=1024, batch_size=32)
# ~75 / 60 / 50% of the non-embedding parameters (SmolLM2: 9 heads / 3 KV heads / MLP 1536 per layer)
WIDTHS = {"tx75": dict(heads=9, kv_heads=3, mlp=1024), "tx60": dict(heads=6, kv_heads=2, mlp=896),
          "tx50": dict(heads=6, kv_heads=2, mlp=672)}
POINTS: dict[str, dict] = {"dense": {}}
GENERATED = dict(train_data="wiki@1,generated@3", gen_tokens=12_000_000)
LRS = {"lr1e-4": 1e-4, "": 3e-4, "lr1e-3": 1e-3}  # the learning-rate grid of both losses (3e-4: no suffix)
for w in WIDTHS:
    POINTS[f"{w}-none"] = dict(widths=w, train_tokens=0)
    for loss in ("kd", "lm"):
        for tag, lr in LRS.items():
            POINTS[f"{w}-{loss}{'-' * bool(tag)}{tag}"] = dict(widths=w, recovery=loss, lr=lr, train_tokens=16_000_000)
    POINTS[f"{w}-kd-50M"] = dict(widths=w, recovery="kd", lr=3e-4, train_tokens=50_000_000)
    # the same 16M tokens, three quarters of them sampled from the teacher (12M distinct tokens, not 64 epochs)
    POINTS[f"{w}-kd-gen"] = dict(widths=w, recovery="kd", lr=3e-4, train_tokens=16_000_000, **GENERATED)
    POINTS[f"{w}-kd-gen-50M"] = dict(widths=w, recovery="kd", lr=3e-4, train_tokens=50_000_000, **GENERATED)
    # the lr grid's best (1e-3 beat 3e-4 by 11% on the pages at 50%), on the generated mixture
    POINTS[f"{w}-kd-gen-lr1e-3"] = POINTS[f"{w}-kd-gen"] | dict(lr=1e-3)
    POINTS[f"{w}-kd-gen-50M-lr1e-3"] = POINTS[f"{w}-kd-gen-50M"] | dict(lr=1e-3)
    # data scaling (issue 24): twice the tokens, the samples raised in proportion (each still read ~2.9 times)
    POINTS[f"{w}-kd-gen-100M"] = dict(widths=w, recovery="kd", lr=3e-4, train_tokens=100_000_000,
                                      **GENERATED | dict(gen_tokens=24_000_000))
    # a better start (issue 24): the least-squares refit at the cut, then the same 16M tokens as kd-gen (same seed)
    POINTS[f"{w}-rc-none"] = dict(widths=w, train_tokens=0, reconstruct=True)
    POINTS[f"{w}-kd-gen-rc"] = POINTS[f"{w}-kd-gen"] | dict(reconstruct=True)
    # iterative (the reference's 8 shots) against the one-shot kd-gen point, at equal tokens, per schedule
    for schedule in ("linear", "final", "equal"):
        POINTS[f"{w}-kd-gen-s8-{schedule}"] = dict(widths=w, recovery="kd", lr=3e-4, train_tokens=16_000_000,
                                                   shots=8, schedule=schedule, **GENERATED)
for n in (8, 15):  # ~75% and ~50% of the layers' parameters
    POINTS[f"depth{n}-llama"] = dict(drop_layers=n, llama_quantize=True)
    POINTS[f"depth{n}-kd"] = dict(drop_layers=n, recovery="kd", lr=3e-4, train_tokens=16_000_000)


def done_rows(path: Path) -> set[tuple[str, str]]:
    """(point, type) pairs already scored (rows with a caveat are to be re-run): a point cut off while
    scoring resumes at its next type."""
    return {(r["point"], r["type"]) for r in read_rows(path) if not r.get("caveat")}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []

TOOLS_DIR: Path | None = None  # --tools


def tool(name: str) -> Path:
    if TOOLS_DIR is not None:
        return TOOLS_DIR / name
    from transact_edge import llamabuild

    for target in ("native", "x86-64-portable"):
        found = llamabuild.find(target, name)
        if found:
            return found
    raise SystemExit(f"{name} is not built: transact-edge build-llama --target native (or x86-64-portable)")


def texts(a) -> dict[str, Path]:
    """The two texts as files llama-perplexity reads."""
    from transact_edge import corpus

    tmp = Path(tempfile.mkdtemp(prefix="frontier-"))
    wiki = tmp / "wiki_eval.txt"
    wiki.write_text("\n\n".join(corpus.default_texts("eval")))
    out = {"wiki": wiki}
    if a.second_text:
        out["news"] = a.second_text
    return out


def perplexity(gguf: Path, text: Path, a, extra: list[str] = ()) -> float:
    cmd = [str(tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", "512", "-b", "512",
           "--chunks", str(a.chunks), "-t", str(a.threads), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"llama-perplexity failed on {gguf}: {(out.stdout + out.stderr)[-2000:]}")
    return float(m.group(1))


def decode_speed(gguf: Path, a, extra: list[str] = ()) -> float:
    cmd = [str(tool("llama-bench")), "-m", str(gguf), "-p", "0", "-n", "64", "-r", "2", "-t", str(a.threads),
           "-o", "json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def quantize(f16: Path, outtype: str, prune_layers: list[int] | None = None, matrix: Path | None = None) -> Path:
    """llama-quantize's file of `outtype`: any type it makes (`q4_k_m`, `iq4_xs`, ...), `+imatrix` with the
    point's importance matrix, `+emb` with the embedding (tied: also the output) at the file's own type."""
    from transact_edge.exporters.quantize import canonical

    base, *mods = outtype.split("+")
    out = f16.with_name(f16.name.replace("-f16.gguf", f"-{outtype}{'-pruned' if prune_layers else ''}.gguf"))
    cmd = [str(tool("llama-quantize"))]
    if prune_layers:
        cmd += ["--prune-layers", ",".join(map(str, prune_layers))]
    if "imatrix" in mods:
        cmd += ["--imatrix", str(matrix)]
    if "emb" in mods:
        cmd += ["--token-embedding-type", base, "--output-tensor-type", base]
    subprocess.run([*cmd, str(f16), str(out), canonical(base).upper()], capture_output=True, check=True)
    return out


def importance_matrix(source: str, f16: Path) -> Path:
    """`export --imatrix auto`'s matrix for the point's model (its calibration pass, once per point)."""
    from transact_edge.exporters import imatrix

    out = f16.with_name(f16.name.replace("-f16.gguf", "-imatrix.gguf"))
    imatrix.auto(source, f16, out)
    return out


def shortgpt_layers(n: int, model: str) -> list[int]:
    """The layers block influence would drop (as prune --drop-layers does), on the point's calibration."""
    import torch

    from transact_edge import corpus, depth
    from transact_edge.loading import load

    loaded = load(model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    calib = corpus.windows(corpus.stream(loaded.tokenizer), CALIB["seq_len"], CALIB["calib_samples"])
    return depth.choose(depth.block_influence(loaded.model.to(dev), calib, 8), n)


def is_pruned(spec: dict) -> bool:
    """Points made by prune() (not the dense model, not llama-quantize's own layer removal)."""
    return bool(spec.get("widths") or spec.get("drop_layers") and not spec.get("llama_quantize"))


def make(name: str, a) -> Path:
    """The point's pruned model under --work: made now, resumed from its last checkpoint, or found
    finished (`prune` makes points on the GPU while another process scores the finished ones)."""
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions, prune

    spec = POINTS[name]
    out = a.work / name
    if not (out / "transact.json").is_file():
        a.work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        widths = WidthRequest(**WIDTHS[spec["widths"]]) if spec.get("widths") else WidthRequest()
        prune(PruneOptions(
            model=a.model, out=out, widths=widths, train_tokens=spec.get("train_tokens", 0),
            recovery=spec.get("recovery", "kd"), lr=spec.get("lr", 3e-4), drop_layers=spec.get("drop_layers", 0),
            shots=spec.get("shots", 1), schedule=spec.get("schedule", "linear"),
            train_data=spec.get("train_data", a.train_data), gen_tokens=spec.get("gen_tokens", 0), gen_cache=a.gen_cache, val_every=50,
            reconstruct=spec.get("reconstruct", False),
            seed=0, resume=True, force=True, checkpoint_minutes=a.checkpoint_minutes, **CALIB))
        print(f"{name}: pruned in {time.perf_counter() - t:.0f} s (this process)", flush=True)
    return out


def pruned(name: str, a) -> tuple[str, dict]:
    """The point's pruned model and what its run recorded."""
    out = make(name, a)
    report = json.loads((out / "transact.json").read_text())
    record = {"params": report["pruned"]["params"], "seconds_prune": sum(report["seconds"].values()),
              "recovery": [{k: v for k, v in s["recovery"].items() if k != "loss_curve"}
                           for s in report["shots"] if "recovery" in s],
              "generated": {k: v for k, v in report.get("generated", {}).items() if k != "file"} or None}
    return str(out), record | {"chat": chat_agreement(str(out), a.model)}


def chat_agreement(model: str, reference: str) -> dict:
    """How often the pruned model's greedy answers to the fixed chat prompts start like the dense model's."""
    import torch

    from transact_edge import chat
    from transact_edge.loading import load

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ours, ref = load(model), load(reference)
    found = chat.agreement(ours.model.to(dev), ref.model.to(dev), ref.tokenizer)
    print(f"{model}: {found.line()}", flush=True)
    return {"agreeing": found.agreeing, "prompts": found.prompts, "n_tokens": found.n_tokens,
            "mean_prefix": found.mean_prefix, "answers": found.answers}


def run_point(name: str, a, types: list[str]) -> None:
    from transact_edge.exporters.gguf import GGUFExportOptions, export

    spec = POINTS[name]
    record: dict = {"point": name, "spec": spec}
    source = a.model
    if is_pruned(spec):
        source, made = pruned(name, a)
        record |= made
    f16 = export(GGUFExportOptions(source, "f16", Path(tempfile.mkdtemp(prefix=f"frontier-{name}-")) / f"{name}-f16.gguf"))
    layers = shortgpt_layers(spec["drop_layers"], a.model) if spec.get("llama_quantize") else None
    record["pruned_layers"] = layers
    files = texts(a)
    info = machine()
    matrix = importance_matrix(source, f16) if any("+imatrix" in t for t in types) else None
    for outtype in types:  # each row appended as soon as it is scored: a slot that runs out keeps what it measured
        gguf = quantize(f16, outtype, layers, matrix) if outtype != "f16" or layers else f16
        row = record | {"type": outtype, "bytes": gguf.stat().st_size, "tg64_tok_s": decode_speed(gguf, a)}
        row |= {f"ppl_{k}": perplexity(gguf, f, a) for k, f in files.items()}
        print(json.dumps({k: row[k] for k in ("point", "type", "bytes", "tg64_tok_s", *[f"ppl_{k}" for k in files])}),
              flush=True)
        with a.results.open("a") as f:
            f.write(json.dumps(row | {"machine": info, "chunks": a.chunks}) + "\n")


SHAPES = {"dense": {}, **{w: dict(widths=w) for w in WIDTHS}, "depth8": dict(drop_layers=8),
          "depth15": dict(drop_layers=15)}
SPEED = RESULTS / "frontier_speed.json"


def shape_of(point: str) -> str:
    """The shape a point's GGUF has: its widths, its layer count, or the dense model's."""
    spec = POINTS.get(point, {})
    return spec.get("widths") or (f"depth{spec['drop_layers']}" if spec.get("drop_layers") else "dense")


def speed(a) -> None:
    """Decode speed of every shape at every type, all on this host in one run: speed depends on the
    shapes, not on the weights' values, so a shape pruned without recovery (on a small calibration)
    stands for every point of that shape, and depth pruning drops the first N layers."""
    from transact_edge.exporters.gguf import GGUFExportOptions, export
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions, prune

    work = Path(tempfile.mkdtemp(prefix="frontier-speed-"))
    rows = []
    for shape, spec in SHAPES.items():
        source, layers = a.model, list(range(spec["drop_layers"])) if spec.get("drop_layers") else None
        if spec.get("widths"):
            source = str(work / shape)
            prune(PruneOptions(model=a.model, out=Path(source), widths=WidthRequest(**WIDTHS[shape]), train_tokens=0,
                               calib_samples=4, seq_len=128, batch_size=4, seed=0))
        f16 = export(GGUFExportOptions(source, "f16", work / f"{shape}-f16.gguf"))
        for outtype in a.types:
            gguf = quantize(f16, outtype, layers) if outtype != "f16" or layers else f16
            rows.append({"shape": shape, "type": outtype, "bytes": gguf.stat().st_size,
                         "tg64_tok_s": decode_speed(gguf, a)})
            print(json.dumps(rows[-1]), flush=True)
    SPEED.write_text(json.dumps({"machine": machine(), "threads": a.threads, "rows": rows}, indent=1))


def pareto(rows: list[dict], key: str, size: str = "bytes", smaller: bool = True) -> set[int]:
    """Indices of rows no other row beats in both `size` (smaller, or larger: a speed) and perplexity."""
    sign = 1 if smaller else -1
    return {i for i, r in enumerate(rows)
            if not any(sign * o[size] <= sign * r[size] and o[key] <= r[key] and (o[size], o[key]) != (r[size], r[key])
                       for o in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["point", "prune", "throughput", "speed", "report"],
                   help="point: prune (or resume) and score; prune: only make the pruned models under --work")
    p.add_argument("points", nargs="*", help=f"point names: {', '.join(POINTS)}")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train-data", help="recovery text (default: the shipped pages)")
    p.add_argument("--second-text", type=Path, help="a text of another domain (e.g. gensim's lee_background.cor)")
    p.add_argument("--chunks", type=int, default=64, help="llama-perplexity chunks of 512 tokens per text")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--results", type=Path, default=RESULTS / "frontier.jsonl")
    p.add_argument("--gen-batches", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    p.add_argument("--gen-caches", type=lambda s: s.split(","), default=["preallocated", "dynamic"],
                   help="KV caches to time sampling with (preallocated, dynamic, static: compiled)")
    p.add_argument("--gen-cache", default="preallocated", help="point: KV cache of the teacher's sampling")
    p.add_argument("--no-steps", action="store_true", help="throughput: time sampling only, not recovery steps")
    p.add_argument("--gen-len", type=int, default=256, help="tokens sampled per sequence")
    p.add_argument("--random-weights", action="store_true", help="throughput: SmolLM2's shapes with random weights "
                   "(no model file needed)")
    p.add_argument("--types", type=lambda v: v.split(","), default=list(TYPES),
                   help=f"GGUF types to score (default: {','.join(TYPES)}; any llama-quantize type, with +imatrix "
                        "(the point's `--imatrix auto` matrix) and/or +emb (embedding at the file's type), e.g. q4_k_m+imatrix)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "frontier-work",
                   help="where pruned points are kept, so a point cut off by its slot resumes from its checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, default=1.0,
                   help="how often a point's recovery checkpoints: often where slots cut it off, rarely where it runs whole")
    p.add_argument("--tools", type=Path, help="directory of llama.cpp's tools (default: transact-edge build-llama's)")
    a = p.parse_args()
    global TOOLS_DIR
    TOOLS_DIR = a.tools
    if a.what == "throughput":
        from frontier_throughput import throughput

        return throughput(a)
    if a.what == "report":
        from frontier_report import report

        return report(a)
    if a.what == "speed":
        return speed(a)
    for name in a.points:
        if name not in POINTS:
            raise SystemExit(f"unknown point {name!r} (choose from {', '.join(POINTS)})")
    for name in a.points:
        if a.what == "prune":
            if is_pruned(POINTS[name]):
                make(name, a)
            continue
        types = [t for t in a.types if (name, t) not in done_rows(a.results)]
        if not types:
            print(f"{name}: every type asked for is in {a.results}; skipped")
            continue
        run_point(name, a, types)


if __name__ == "__main__":
    main()
