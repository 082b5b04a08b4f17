"""Seeded, structure-aware mutation fuzzing of every reader of user files (issue 15, item 3).

`python tests/fuzzing.py --work DIR --json OUT [--cases N] [--seed S] [--only gguf-header,...]` builds tiny
valid files (a BPE tokenizer of 320 tokens, a 2-layer Llama, a per-layer `deci` model, their GGUFs),
then for each reader mutates them case after case and hands each result to the project's own reader:
GGUF counts, string lengths, value types, array sizes, tensor shapes, types and offsets, tensor data cut
short; safetensors header lengths, dtypes, shapes and offsets; config.json sizes, types and syntax;
tokenizer files; calibration and training text (binary, empty, one token, huge lines) (tests/mutations.py).

A clean case is accepted, or refused with a UserError of one line. Anything else is a finding: another
exception type, a MemoryError (after warm-up the address space is capped at its size then + 1 GiB, so
an allocation driven by a size the file claims fails instead of passing unnoticed), or a case that runs
over CASE_SECONDS of CPU time. The summary counts outcomes per reader and names the slowest case.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import resource
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

from mutations import kitchen_sink, mutate_gguf, mutate_json, mutate_safetensors, mutate_text

CAP_BYTES = 1 << 30       # growth of the address space allowed after warm-up
CASE_SECONDS = 30
# Cases per reader by default (the normal suite): the header reader is cheap, text tokenization is not.
DEFAULT_CASES = {"gguf-header": 3000, "gguf-load": 100, "safetensors": 100, "config": 100, "tokenizer": 100,
                 "calib": 30, "train-data": 30}


class CaseTimeout(BaseException):
    """A case ran over CASE_SECONDS (BaseException: no reader may swallow it)."""


# ---------------------------------------------------------------- fixtures

def build(work: Path) -> dict[str, Path]:
    """Tiny valid inputs: model directories, GGUFs (llama, deci, every value type), texts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from transact_edge import corpus, plan
    from transact_edge.calibration import collect
    from transact_edge.checkpoint import save
    from transact_edge.exporters.gguf import GGUFExportOptions, export
    from transact_edge.salience import from_stats
    from transact_edge.shapes import LayerShape, layer_shapes
    from transact_edge.surgery import cut

    texts = corpus.default_texts("train")[:12]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=len(tok), max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    files = {"llama": work / "llama", "deci": work / "deci"}
    save(files["llama"], model, tok)
    shapes = layer_shapes(cfg)
    ids = corpus.token_stream(tok, texts[:2])[:64][None]
    widths = [LayerShape(2, 1, 32), LayerShape(4, 2, 64)]
    save(files["deci"], cut(model, plan.select(from_stats(collect(model, ids), shapes), shapes, widths)), tok)
    for name in ("llama", "deci"):
        files[f"{name}.gguf"] = export(GGUFExportOptions(str(files[name]), "f32", work / f"{name}.gguf"))
    files["kitchen.gguf"] = kitchen_sink(work / "kitchen.gguf")
    files["calib.txt"] = work / "calib.txt"
    files["calib.txt"].write_text("\n\n".join(texts[:2]))
    files["calib.jsonl"] = work / "calib.jsonl"
    files["calib.jsonl"].write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in texts[:4]))
    return files


# ---------------------------------------------------------------- readers

CFG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "model_type",
            "rope_parameters", "bos_token_id", "eos_token_id", "torch_dtype", "architectures"]


def readers(files: dict[str, Path], work: Path) -> dict:
    """reader name -> (make(rng) -> (path written, ops), check(path) -> None). A check runs every reader
    of that kind of file on the case, each on its own: any may refuse, none may fail otherwise."""
    makers, checks = _makers(files, work), _checks(files, work)
    return {name: (makers[name], check) for name, check in checks.items()}


def _makers(files: dict[str, Path], work: Path) -> dict:
    """reader name -> make(rng): each campaign's case, one valid file mutated and written under `work`."""
    seeds = {name: files[name].read_bytes() for name in ("llama.gguf", "deci.gguf", "kitchen.gguf")}
    case_dir = work / "case"
    _copy_dir(files["llama"], case_dir)
    st_seed = (files["llama"] / "model.safetensors").read_bytes()
    cfg_seed = (files["llama"] / "config.json").read_text()
    tok_seeds = {n: (files["llama"] / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    texts = {".txt": files["calib.txt"].read_bytes(), ".jsonl": files["calib.jsonl"].read_bytes()}

    def gguf_case(names, bias):
        def make(rng):
            name = rng.choice(names)
            data, ops = mutate_gguf(seeds[name], rng, bias)
            return _publish(work / "case.gguf", data), [name, *ops]
        return make

    def dir_case(filename, mutate):
        """The model directory with one of its files mutated (the others as built)."""
        def make(rng):
            for n, data in {"config.json": cfg_seed.encode(), "model.safetensors": st_seed,
                            **{n: t.encode() for n, t in tok_seeds.items()}}.items():
                _publish(case_dir / n, data)
            name = filename(rng) if callable(filename) else filename
            data, ops = mutate(name, rng)
            _publish(case_dir / name, data)
            return case_dir, [name, *ops]
        return make

    def text_case(rng):
        suffix = rng.choice([".txt", ".jsonl"])
        data, ops = mutate_text(texts[suffix], rng, suffix == ".jsonl")
        return _publish(work / f"case{suffix}", data), [suffix, *ops]  # (not the calibration file of prune --stream)

    return {"gguf-header": gguf_case(list(seeds), 0.3), "gguf-load": gguf_case(["llama.gguf", "deci.gguf"], 0.5),
            "safetensors": dir_case("model.safetensors", lambda n, rng: mutate_safetensors(st_seed, rng)),
            "config": dir_case("config.json", lambda n, rng: mutate_json(cfg_seed, rng, CFG_KEYS)),
            "tokenizer": dir_case(lambda rng: rng.choices(list(tok_seeds), [4, 1])[0],
                                  lambda n, rng: mutate_json(tok_seeds[n], rng)),
            "calib": text_case, "train-data": text_case}


def _checks(files: dict[str, Path], work: Path) -> dict:
    """reader name -> check(path): every reader of that kind of file, run on a case."""
    from transact_edge import corpus, plan, traindata
    from transact_edge.bench.facts import gguf_facts
    from transact_edge.exporters.gguf import GGUFExportOptions, export
    from transact_edge.ggufmap import read_header
    from transact_edge.inspect import describe
    from transact_edge.loading import check_gguf, load, read_config
    try:
        from transact_edge.loading import load_tokenizer
    except ImportError:  # the code before the fixes, run to count what the fuzzing found
        from transformers import AutoTokenizer as _auto

        load_tokenizer = _auto.from_pretrained
    from transact_edge.options import PruneOptions
    from transact_edge.prune import prune
    from transact_edge.stream import Weights

    tok = load_tokenizer(files["llama"])

    def to_gguf(path):
        export(GGUFExportOptions(str(path), "f32", work / "exported.gguf"))

    def streamed(path):  # prune --stream: config, every tensor and the tokenizer read layer by layer
        prune(PruneOptions(str(path), work / "pruned", plan.WidthRequest(kv_heads=1), stream=True,
                           calib=str(files["calib.txt"]), calib_samples=2, seq_len=16, force=True))

    every_model_reader = [lambda p: load(str(p)), lambda p: describe(str(p)), to_gguf, streamed,
                          lambda p: Weights(p).read(sorted(Weights(p).files))]
    return {
        "gguf-header": _each(read_header, lambda p: describe(str(p)), gguf_facts),
        "gguf-load": _each(check_gguf, lambda p: load(str(p))),
        "safetensors": _each(*every_model_reader),
        "config": _each(lambda p: read_config(str(p)), *every_model_reader),
        "tokenizer": _each(lambda p: corpus.token_stream(load_tokenizer(p), ["The quick brown fox.", "a"]),
                           lambda p: load(str(p)), to_gguf, streamed),
        "calib": _each(lambda p: corpus.windows(corpus.stream(tok, str(p)), 16, 4)),
        "train-data": _each(lambda p: _train(traindata, tok, p)),
    }


def _each(*checks):
    """One check of a case that runs every reader on it: any may refuse (the first refusal is raised
    after all ran), any other exception escapes at once."""
    from transact_edge.errors import UserError

    def check(path: Path) -> None:
        refusal = None
        for c in checks:
            try:
                c(path)
            except UserError as e:
                refusal = refusal or e
        if refusal is not None:
            raise refusal
    return check


def _train(traindata, tok, path: Path) -> None:
    source = traindata.parse(f"{path}@1")[0]
    stream = traindata.TokenStream(source.name, 16, tokenizer=tok)
    stream.hold_apart(1)
    stream.take(8)


def _publish(path: Path, data: bytes) -> Path:
    """Write by rename: a reader of the previous case may still map the old file."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _copy_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            _publish(dst / f.name, f.read_bytes())


# ---------------------------------------------------------------- the loop

def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _on_alarm(signum, frame):
    raise CaseTimeout(f"over {CASE_SECONDS} CPU s")


def run_case(check, path: Path) -> tuple[str, str]:
    """('accepted' | 'refused' | 'finding', detail) of one case."""
    from transact_edge.errors import UserError

    signal.setitimer(signal.ITIMER_PROF, CASE_SECONDS)  # CPU seconds: a busy or paused machine is no finding
    try:
        check(path)
        return "accepted", ""
    except UserError as e:
        msg = str(e)
        return ("refused", msg) if msg and "\n" not in msg else ("finding", f"UserError of {msg.count(chr(10)) + 1} lines")
    except BaseException as e:  # noqa: BLE001  (the point: nothing else may escape, not even a Rust panic)
        if isinstance(e, KeyboardInterrupt):
            raise
        ours = [f for f in traceback.extract_tb(e.__traceback__) if "/transact_edge/" in f.filename]
        where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else ""
        return "finding", f"{type(e).__name__}{where}: {str(e)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


def fuzz(name: str, make, check, cases: int, seed: int, magic_kept=None) -> dict:
    counts, findings, refusals, kinds = Counter(), [], Counter(), Counter()
    slowest, past_magic, jump, peak = {"seconds": -1.0}, 0, {"mib": -1.0}, 0.0
    start = time.perf_counter()
    for i in range(cases):
        rng = random.Random(f"{name}/{seed}/{i}")
        path, ops = make(rng)
        if magic_kept is not None:
            past_magic += magic_kept(path)
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) restarts from the current RSS
        before = _rss_mib()
        t = time.perf_counter()
        outcome, detail = run_case(check, path)
        dt = time.perf_counter() - t
        peak = max(peak, _rss_mib("VmHWM"))
        grew = _rss_mib("VmHWM") - before  # what this case added at its peak
        counts[outcome] += 1
        if outcome == "finding":
            findings.append({"case": i, "ops": ops, "error": detail})
            kinds[detail.split(": ")[0]] += 1
        elif outcome == "refused":
            refusals[re.sub(r"\d+", "N", detail.replace(str(path), "PATH"))[:120]] += 1
        if dt > slowest["seconds"]:
            slowest = {"case": i, "seconds": round(dt, 4), "ops": ops, "outcome": outcome, "detail": detail[:200]}
        if grew > jump["mib"]:
            jump = {"case": i, "mib": round(grew, 1), "ops": ops, "outcome": outcome}
    return {"reader": name, "cases": cases, "seed": seed, "accepted": counts["accepted"], "refused": counts["refused"],
            "findings": len(findings), "finding_kinds": kinds.most_common(), "finding_cases": findings[:20], "past_magic": past_magic if magic_kept else None,
            "seconds": round(time.perf_counter() - start, 2), "slowest_case": slowest, "largest_case_rss_growth": jump, "peak_rss_mib": round(peak, 1),
            "top_refusals": refusals.most_common(12)}


def _gguf_magic_kept(path: Path) -> bool:
    head = path.read_bytes()[:8]
    return head[:4] == b"GGUF" and int.from_bytes(head[4:8], "little") in (2, 3)


def main(argv: list[str] | None = None) -> int:
    global CASE_SECONDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=0, help="cases per reader, the GGUF header reader ten times more "
                    "(default: DEFAULT_CASES)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated readers")
    ap.add_argument("--work", type=Path, required=True, help="scratch directory")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--case-seconds", type=float, default=CASE_SECONDS, help="a case running longer is a finding")
    a = ap.parse_args(argv)
    CASE_SECONDS = a.case_seconds
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGPROF, _on_alarm)
    t0 = time.perf_counter()
    files = build(a.work)
    table = readers(files, a.work)
    chosen = [r for r in table if not a.only or r in a.only.split(",")]
    valid = {"gguf-header": files["llama.gguf"], "gguf-load": files["deci.gguf"], "calib": files["calib.jsonl"],
             "train-data": files["calib.txt"]}
    for name in chosen:  # warm-up: libraries imported, caches and thread pools made, before the cap
        run_case(table[name][1], valid.get(name, files["llama"]))  # every reader's path through a valid file
        for i in range(3):
            run_case(table[name][1], table[name][0](random.Random(f"warm/{name}/{i}"))[0])
    warm_peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    counts = {name: a.cases * (10 if name == "gguf-header" else 1) if a.cases else n for name, n in DEFAULT_CASES.items()}
    results = [_forked(lambda: _capped(name, table[name], counts[name], a.seed)) | {"reader": name} for name in chosen]
    summary = {"readers": results, "baseline_rss_mib": max(r["baseline_rss_mib"] for r in results),
               "warm_up_peak_rss_mib": warm_peak, "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
               "cap_catches_allocations": all(r["cap_catches_allocations"] for r in results),
               "seconds": round(time.perf_counter() - t0, 1)}
    a.json.write_text(json.dumps(summary, indent=1))
    return 0


def _capped(name: str, reader, cases: int, seed: int) -> dict:
    """One reader's campaign under an address space capped at its warmed-up size + CAP_BYTES."""
    baseline_rss, baseline_vm = _rss_mib(), _rss_mib("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (int(baseline_vm * 2**20) + CAP_BYTES, resource.RLIM_INFINITY))
    try:  # the cap is live: an allocation past it fails
        bytearray(CAP_BYTES + CAP_BYTES // 4)
        caught = False
    except MemoryError:
        caught = True
    result = fuzz(name, *reader, cases, seed, _gguf_magic_kept if name.startswith("gguf") else None)
    return result | {"baseline_rss_mib": round(baseline_rss, 1), "address_space_cap_mib": round(baseline_vm + CAP_BYTES / 2**20),
                     "cap_catches_allocations": caught}


def _forked(run) -> dict:
    """run() in a child process, so that each reader's campaign starts from the warmed-up parent: what one
    reader's cases leave behind does not count against the next (each fast tokenizer transformers loads and
    uses leaves ~2.3 MB of native memory after it is freed; tokenizers' own Tokenizer does not). A child
    that dies (a Rust abort on a failed allocation, a signal) is a finding."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            data = json.dumps(run()).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    death = f"the campaign's process died ({'signal ' + str(-os.waitstatus_to_exitcode(status))})"
    return {"cases": 0, "accepted": 0, "refused": 0, "findings": 1, "finding_kinds": [[death, 1]],
            "finding_cases": [{"error": death}], "peak_rss_mib": 0.0, "baseline_rss_mib": 0.0,
            "cap_catches_allocations": False, "largest_case_rss_growth": {"mib": -1.0}, "top_refusals": [],
            "slowest_case": {"seconds": None, "ops": []}, "past_magic": None}


if __name__ == "__main__":
    sys.exit(main())
