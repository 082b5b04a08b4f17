"""Command line: transact-edge prune | export | eval | inspect | demo.

Each subcommand parses its arguments into the library's option dataclass and calls one library
function. Heavy imports happen inside the handlers. Only this module turns errors into exit codes:
bad input prints one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from transact_edge.args import build_parser
from transact_edge.devices import PROFILES
from transact_edge.errors import UserError


def _prune_options(a: argparse.Namespace):
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions

    return PruneOptions(
        model=a.model, out=a.out,
        widths=WidthRequest(a.heads, a.kv_heads, a.mlp, a.attn_ratio, a.mlp_ratio, a.round_to),
        per_layer=a.per_layer, metric=a.metric, stream=a.stream, shots=a.shots, train_tokens=a.train_tokens,
        schedule=a.schedule, recovery=a.recovery, kd_temperature=a.kd_temperature, kd_alpha=a.kd_alpha,
        teacher=a.teacher, train_data=a.train_data, gen_tokens=a.gen_tokens, gen_len=a.gen_len,
        gen_batch=a.gen_batch, gen_cache=a.gen_cache, val_windows=a.val_windows, val_every=a.val_every,
        checkpoint_minutes=a.checkpoint_minutes, drop_layers=a.drop_layers, calib=a.calib,
        calib_samples=a.calib_samples, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        eval=a.eval, eval_tokens=a.eval_tokens, resume=a.resume, force=a.force, device=a.device,
        sharding=getattr(a, "sharding", "ddp"), plan=a.plan,
        reconstruct=a.reconstruct, imatrix=a.imatrix)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def cmd_prune(a: argparse.Namespace) -> int:
    from transact_edge.prune import check, prune

    opts = _prune_options(a)
    if a.launcher:
        from transact_edge import distributed

        processes = a.processes or max(2, _gpus())
        check(opts, processes)  # bad options: one line here, not one traceback per process
        return distributed.launch(a.launcher, processes, a.argv)
    report = prune(opts)
    if os.environ.get("RANK", "0") == "0":  # under a launcher, process 0 speaks for all
        print(_summary_table(report))
        data = _data_line(report)
        if data:
            print(data)
        print(f"wrote {a.out}")
    return 0


def _summary_table(report) -> str:
    """Dense and pruned widths, sizes and perplexities of a record.Record, as a markdown table."""
    lines = ["| model | params | heads / KV heads | MLP | KV bytes/token (f16) | perplexity |",
             "|---|---:|---|---|---:|---:|"]
    rows = {"dense": (report.dense, report.evaluation.before), "pruned": (report.pruned, report.evaluation.after)}
    for name, (s, ppl) in rows.items():
        heads = sorted({(l["n_head"], l["n_kv_head"]) for l in s.layers})
        mlp = sorted({l["ffn_dim"] for l in s.layers})
        lines.append(f"| {name} | {s.params:,} | {', '.join(f'{h}/{k}' for h, k in heads)} | "
                     f"{mlp[0] if len(mlp) == 1 else f'{mlp[0]}..{mlp[-1]}'} | {s.kv_bytes_per_token_f16:,} | "
                     + (f"{ppl['ppl']:.2f} |" if ppl else "- |"))
    ppl = report.evaluation.after
    if ppl:
        lines.append(f"\nperplexity protocol: {ppl['text']}, window {ppl['window']}, stride {ppl['stride']}, "
                     f"{ppl['tokens']} tokens scored")
    return "\n".join(lines)


def _data_line(report) -> str | None:
    """How much of each recovery source was read: repeated epochs are where LM loss memorises."""
    recovered = [s.recovery for s in report.shots if (s.recovery or {}).get("data")]
    if not recovered:
        return None
    parts = [f"{d['source']} {d['tokens_read']:,} tokens" + (f" ({d['epochs']:.1f} epochs)" if d["epochs"] else "")
             for d in recovered[-1]["data"]]
    return f"recovery ({recovered[-1]['loss']}) read: " + ", ".join(parts)


def cmd_eval(a: argparse.Namespace) -> int:
    from transact_edge import corpus
    from transact_edge.evaluate import perplexity
    from transact_edge.loading import load

    if not a.ppl and not a.lm_eval and not a.chat_agreement:
        raise UserError("eval: nothing to do; give --ppl, --lm-eval TASKS and/or --chat-agreement")
    if a.lm_eval_include and not a.lm_eval_include.is_dir():
        raise UserError(f"--lm-eval-include: no such directory: {a.lm_eval_include}")
    loaded = load(a.path)
    if a.chat_agreement:
        from transact_edge.chat import agreement
        from transact_edge import record

        made = record.read(Path(a.path)) if Path(a.path).is_dir() else None
        ref = a.chat_agreement if a.chat_agreement != "source" else (made.source.model if made else None)
        if not ref:
            raise UserError(f"--chat-agreement: {a.path} records no source model; name the reference model")
        result = agreement(loaded.model, load(ref).model, loaded.tokenizer)
        print(f"{a.path} vs {ref}: {result.line()}")
        if not a.ppl and not a.lm_eval:
            return 0
    if a.lm_eval:
        from transact_edge import lmeval

        _, table = lmeval.evaluate(loaded.model, loaded.tokenizer, [t for t in a.lm_eval.split(",") if t],
                                   a.lm_eval_limit, a.batch_size, a.lm_eval_include)
        print(f"{a.path}: lm-eval [runtime: torch]\n{table}")
        if not a.ppl:
            return 0
    if a.text == corpus.DEFAULT:
        ids, name = corpus.stream(loaded.tokenizer, corpus.DEFAULT, "eval"), "shipped Wikipedia held-out pages"
    else:
        ids, name = corpus.token_stream(loaded.tokenizer, corpus.read_texts(a.text)), a.text
    model = loaded.model  # torch: the checkpoint already loaded; other runtimes open the file exported from it
    if a.runtime != "torch":
        from transact_edge.runtimes import open_runtime

        flag = {"onnxruntime": "onnx", "llama.cpp": "gguf"}.get(a.runtime)
        if flag and not (getattr(a, flag) and getattr(a, flag).is_file()):
            raise UserError(f"--runtime {a.runtime} needs --{flag} FILE (the file exported from {a.path})")
        model = open_runtime(a.runtime, getattr(a, flag or "onnx"), n_ctx=a.window).logits
    result = perplexity(model, ids, a.window, a.stride, a.max_tokens, a.batch_size, text=name)
    print(f"{a.path}: {result.line()} [runtime: {a.runtime}]")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from transact_edge.inspect import as_json, describe, render

    info = describe(a.path, a.kv_ctx)
    print(as_json(info) if a.json else render(info))
    return 0


# --format -> (exporter module, its options from the arguments, the kind its verification checks)
FORMATS = {
    "gguf": ("transact_edge.exporters.gguf",
             lambda m, a: m.GGUFExportOptions(a.path, a.outtype or "f16", a.outfile, a.imatrix, a.token_embedding_type,
                                              a.output_tensor_type),
             lambda a: (a.outtype or "f16").lower()),
    "onnx": ("transact_edge.exporters.onnx",
             lambda m, a: m.ONNXExportOptions(a.path, a.outfile, a.dtype, a.quantize, a.block_size, a.int4_algo),
             lambda a: a.quantize or a.dtype),
}


def cmd_export(a: argparse.Namespace) -> int:
    import importlib

    from transact_edge.loading import load

    if a.format not in FORMATS:
        raise UserError(f"unknown --format {a.format!r}; choose from {', '.join(FORMATS)}")
    gguf_only = [f for f in ("imatrix", "token_embedding_type", "output_tensor_type") if getattr(a, f)]
    if a.format != "gguf" and gguf_only:
        raise UserError(f"--{gguf_only[0].replace('_', '-')} is llama-quantize's: it applies to --format gguf only")
    name, options, kind_of = FORMATS[a.format]
    exporter = importlib.import_module(name)
    out, kind = exporter.export(options(exporter, a)), kind_of(a)
    size = sum(f.stat().st_size for f in out.parent.glob(out.name + "*"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {kind})")
    if not a.verify:
        return 0
    loaded = load(a.path)
    result = exporter.verify(out, loaded.model, loaded.tokenizer, kind)
    print(result.line())
    return 1 if result.passed is False else 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The whole chain on the embedded model with a budget that fits a few minutes on 2 cores."""
    from transact_edge.prune import prune

    opts = _prune_options(a)
    print(f"demo: pruning {opts.model} to {opts.widths.kv_heads} KV heads and MLP x{opts.widths.mlp_ratio} "
          f"in {opts.shots} shots{' with the refit at each cut' if opts.reconstruct else ''}, {opts.train_tokens} "
          f"recovery tokens, writing {opts.out}", flush=True)
    report = prune(opts)
    print(_summary_table(report))

    from transact_edge.exporters.gguf import GGUFExportOptions, export, verify
    from transact_edge.loading import load

    loaded = load(str(opts.out))
    print("\n| GGUF | MiB | top-1 vs torch | max abs diff | KL | ppl torch | ppl llama.cpp | check |\n|---|---:|---:|---:|---:|---:|---:|---|")
    failed, ggufs = False, {}
    for outtype in ("f16", "q8_0"):
        path = ggufs[outtype] = export(GGUFExportOptions(str(opts.out), outtype))
        v = verify(path, loaded.model, loaded.tokenizer, outtype)
        a = v.agreement
        failed |= v.passed is False
        print(f"| {path.name} | {path.stat().st_size / 2**20:.1f} | {100 * a.top1:.2f}% | {a.max_abs_diff:.3f} | "
              f"{a.kl:.5f} | {a.ppl_reference:.2f} | {a.ppl_other:.2f} | {'pass' if v.passed else 'FAIL'} ({v.rule}) |")

    from transact_edge.exporters import onnx

    path = onnx.export(onnx.ONNXExportOptions(str(opts.out)))
    v = onnx.verify(path, loaded.model, loaded.tokenizer, "fp32")
    failed |= v.passed is False
    print(f"\n{path.parent.name}/{path.name}: {v.line()}")

    from transact_edge import bench
    from transact_edge.devices import Local

    dense = export(GGUFExportOptions(opts.model, "q8_0", opts.out.parent / f"{opts.model}-q8_0.gguf"))
    print(f"\ndense vs pruned on this machine (transact-edge bench {dense.name} {ggufs['q8_0'].name} "
          f"-p 128 -n 32 -r 3):\n", flush=True)
    with Local() as device:
        report = bench.run([str(dense), str(ggufs["q8_0"])], "llama.cpp", bench.Tests([128], [32], [0]), None, 3,
                           device)
    print(bench.render(report, "md"), end="")

    from importlib import resources

    from transact_edge.chat import agreement

    dense_model = load(opts.model).model
    print(f"\nthis run, chat: {agreement(loaded.model, dense_model, loaded.tokenizer).line()}")
    print(f"\nThis run recovered on {opts.train_tokens:,} tokens on this CPU: it shows the chain, not the quality a "
          "real recovery budget buys.\nThe committed GPU frontier (benchmarks/results/frontier.md, measured there, "
          "not by this run):\n")
    print(resources.files("transact_edge").joinpath("data/frontier.md").read_text())
    return 1 if failed else 0


def cmd_bench(a: argparse.Namespace) -> int:
    from transact_edge import bench
    from transact_edge.devices import open_device

    if a.profile and a.profile not in PROFILES:
        raise UserError(f"unknown profile {a.profile!r} (choose from {', '.join(PROFILES)})")
    if a.output not in ("md", "json", "csv"):
        raise UserError(f"unknown output format {a.output!r} (md, json or csv)")
    tests = bench.Tests(bench.int_list(a.n_prompt, "-p"), bench.int_list(a.n_gen, "-n"),
                        bench.int_list(a.n_depth, "-d"), [bench.pair(t) for t in a.pg])
    tests.cases()
    for model in a.models:  # before touching any device
        if a.runtime != "torch" and not (Path(model).is_file() or a.runtime == "onnxruntime-genai" and Path(model).is_dir()):
            raise UserError(f"model file not found: {model}")
    with open_device(a.device, tuple(a.ssh_option), a.target) as device:
        report = bench.run(a.models, a.runtime, tests, a.threads, a.reps, device, PROFILES.get(a.profile), a.greedy)
    print(bench.render(report, a.output), end="")
    return 0


def cmd_build_llama(a: argparse.Namespace) -> int:
    from transact_edge import llamabuild

    out = llamabuild.build(a.target, a.ndk, a.jobs, a.force)
    print(f"llama.cpp {llamabuild.version()} ({a.target}): " + ", ".join(str(out / t) for t in llamabuild.published(a.target)))
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "inspect": cmd_inspect, "bench": cmd_bench,
            "build-llama": cmd_build_llama, "demo": cmd_demo}


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so every `with` on the way out removes its temporaries."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _signals() -> dict:
    """SIGTERM cleans up like Ctrl-C; SIGXFSZ (a file-size limit) fails the write instead of killing us
    mid-file. Returns the handlers replaced (none when not on the main thread, where Python allows none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    wanted = {signal.SIGTERM: _terminate, signal.SIGXFSZ: signal.SIG_IGN}
    return {s: signal.signal(s, h) for s, h in wanted.items()}


def _fail(message: str, code: int) -> int:
    """The one line a failed run ends with, on a line of its own even when a progress bar was cut short."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(tqdm.tqdm, "_instances", [])) if tqdm else []
    for bar in bars:
        bar.close()
    lead = "\n" if bars else ""
    print(f"{lead}transact-edge: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    replaced = _signals()
    try:
        args = build_parser().parse_args(argv)
        command = COMMANDS[args.command]
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher runs again
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(name)s: %(message)s")
        quiet = os.environ.get("RANK", "0") != "0"  # the other processes of a launched run
        logging.getLogger("transact_edge").setLevel(logging.WARNING if quiet else logging.INFO)
        if "transformers" in sys.modules:  # imported before the variable above was set (a caller's process)
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        return command(args)  # (else HF_HUB_DISABLE_PROGRESS_BARS silences transformers' own bars when it loads)
    except UserError as e:
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Terminated:
        return _fail("terminated", 143)
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
