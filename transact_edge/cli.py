"""Command line: transact-edge prune | export | eval | inspect | demo.

Each subcommand parses its arguments into the library's option dataclass and calls one library
function. Heavy imports happen inside the handlers. Only this module turns errors into exit codes:
bad input prints one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from transact_edge.devices import PROFILES
from transact_edge.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse's default prints the usage too)
        raise UserError(message)


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="Hugging Face directory, .gguf file, or embedded name (default: smollm2-135m)")
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    w = p.add_argument_group("widths (uniform in every layer unless --per-layer)")
    w.add_argument("--heads", type=int, help="query heads to keep (a multiple of the KV heads kept)")
    w.add_argument("--kv-heads", type=int, help="KV heads (GQA groups) to keep; shrinks the KV cache")
    w.add_argument("--attn-ratio", type=float, help="fraction of KV groups to keep, in (0, 1]")
    w.add_argument("--mlp", type=int, help="MLP channels to keep")
    w.add_argument("--mlp-ratio", type=float, help="fraction of MLP channels to keep, in (0, 1]")
    w.add_argument("--round-to", type=int, default=32, help="MLP widths in multiples of this (256 suits K-quants)")
    w.add_argument("--per-layer", action="store_true", help="let widths differ per layer (salience allocation)")
    w.add_argument("--plan", metavar="TRANSACT_JSON", help="replay the cut recorded in a transact.json (or its "
                   "directory) on this model of the same shapes: no calibration (e.g. base model's plan -> instruct)")
    w.add_argument("--metric", default="acts", help="what ranks heads and channels: acts (TransAct, default), "
                   "magnitude, taylor or random (baselines)")
    s = p.add_argument_group("schedule")
    s.add_argument("--shots", type=int, default=1, help="iterative pruning shots (reference: 8)")
    s.add_argument("--train-tokens", type=_positive_int, default=0, help="recovery-training tokens over all shots")
    s.add_argument("--schedule", default="linear", help="recovery tokens over the shots: linear (rising, the "
                   "reference), final (80%% after the last cut, Minitron) or equal")
    s.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of recovery training")
    s.add_argument("--calib", default="wiki", help="'wiki' (shipped) or a .txt/.jsonl file or dataset directory")
    s.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    s.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration/training window")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r = p.add_argument_group("recovery (with --train-tokens > 0)")
    r.add_argument("--recovery", default="kd", help="kd: distil from the teacher (forward KL on logits, default); "
                   "lm: next-token loss on the training data")
    r.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature of both models (1.0)")
    r.add_argument("--kd-alpha", type=float, default=0.0, help="weight of an added LM loss in kd mode (0)")
    r.add_argument("--teacher", help="teacher model (default: the dense source model)")
    r.add_argument("--train-data", metavar="SPEC", help="recovery text, streamed: the --calib forms or 'generated', "
                   "mixed as wiki@1,generated@3 (default: the calibration corpus)")
    r.add_argument("--gen-tokens", type=_positive_int, default=0, help="tokens the teacher samples for 'generated'")
    r.add_argument("--gen-len", type=int, default=256, help="tokens sampled per generated sequence")
    r.add_argument("--gen-batch", type=_positive_int, default=0, help="sequences sampled at once (0: automatic)")
    r.add_argument("--val-windows", type=_positive_int, default=8,
                   help="validation windows held apart from the first training source (0: none)")
    r.add_argument("--val-every", type=_positive_int, default=0, help="steps between validation losses "
                   "(0: 20 per shot)")
    r.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save the training state inside a shot at least this often (for --resume)")
    w.add_argument("--drop-layers", type=_positive_int, default=0, help="depth pruning: remove the N layers "
                   "that change the hidden state least (ShortGPT block influence) before the first shot")
    p.add_argument("--eval", action="store_true", help="held-out perplexity before and after")
    p.add_argument("--eval-tokens", type=int, help="cap on held-out tokens scored")
    p.add_argument("--resume", action="store_true", help="continue after the last finished shot")
    p.add_argument("--stream", action="store_true", help="one shot, layer by layer from the safetensors files: "
                   "memory of one layer plus the calibration activations (7B-class models on a 24 GiB machine)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _prune_options(a: argparse.Namespace):
    from transact_edge.plan import WidthRequest
    from transact_edge.prune import PruneOptions

    return PruneOptions(
        model=a.model, out=a.out,
        widths=WidthRequest(a.heads, a.kv_heads, a.mlp, a.attn_ratio, a.mlp_ratio, a.round_to),
        per_layer=a.per_layer, metric=a.metric, stream=a.stream, shots=a.shots, train_tokens=a.train_tokens,
        schedule=a.schedule, recovery=a.recovery, kd_temperature=a.kd_temperature, kd_alpha=a.kd_alpha,
        teacher=a.teacher, train_data=a.train_data, gen_tokens=a.gen_tokens, gen_len=a.gen_len,
        gen_batch=a.gen_batch, val_windows=a.val_windows, val_every=a.val_every,
        checkpoint_minutes=a.checkpoint_minutes, drop_layers=a.drop_layers, calib=a.calib,
        calib_samples=a.calib_samples, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        eval=a.eval, eval_tokens=a.eval_tokens, resume=a.resume, force=a.force, device=a.device,
        sharding=getattr(a, "sharding", "ddp"), plan=a.plan)


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
        print(_summary_table({"dense": report["dense"], "pruned": report["pruned"]}, report))
        data = _data_line(report)
        if data:
            print(data)
        print(f"wrote {a.out}")
    return 0


def _summary_table(rows: dict, report: dict) -> str:
    lines = ["| model | params | heads / KV heads | MLP | KV bytes/token (f16) | perplexity |",
             "|---|---:|---|---|---:|---:|"]
    for name, s in rows.items():
        layers = s["layers"]
        heads = sorted({(l["n_head"], l["n_kv_head"]) for l in layers})
        mlp = sorted({l["ffn_dim"] for l in layers})
        ppl = report.get(f"perplexity_{'before' if name == 'dense' else 'after'}")
        lines.append(f"| {name} | {s['params']:,} | {', '.join(f'{h}/{k}' for h, k in heads)} | "
                     f"{mlp[0] if len(mlp) == 1 else f'{mlp[0]}..{mlp[-1]}'} | {s['kv_bytes_per_token_f16']:,} | "
                     + (f"{ppl['ppl']:.2f} |" if ppl else "- |"))
    ppl = report.get("perplexity_after")
    if ppl:
        lines.append(f"\nperplexity protocol: {ppl['text']}, window {ppl['window']}, stride {ppl['stride']}, "
                     f"{ppl['tokens']} tokens scored")
    return "\n".join(lines)


def _data_line(report: dict) -> str | None:
    """How much of each recovery source was read: repeated epochs are where LM loss memorises."""
    recovered = [s["recovery"] for s in report.get("shots", []) if s.get("recovery", {}).get("data")]
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
        from transact_edge.checkpoint import read_report

        ref = a.chat_agreement if a.chat_agreement != "source" else (
            (read_report(Path(a.path)) or {}).get("source", {}).get("model") if Path(a.path).is_dir() else None)
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
    model = loaded.model
    if a.runtime == "onnxruntime":
        from transact_edge.ortruntime import OrtModel

        if not a.onnx:
            raise UserError("--runtime onnxruntime needs --onnx FILE (the exported graph)")
        model = OrtModel(a.onnx).logits
    elif a.runtime == "llama.cpp":
        from transact_edge.llamacpp import open_gguf

        if not a.gguf or not a.gguf.is_file():
            raise UserError("--runtime llama.cpp needs --gguf FILE (the exported GGUF)")
        model = open_gguf(a.gguf, n_ctx=a.window).batch_logits
    elif a.runtime != "torch":
        raise UserError(f"unknown --runtime {a.runtime!r}; choose from torch, onnxruntime, llama.cpp")
    result = perplexity(model, ids, a.window, a.stride, a.max_tokens, a.batch_size, text=name)
    print(f"{a.path}: {result.line()} [runtime: {a.runtime}]")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from transact_edge.inspect import as_json, describe, render

    info = describe(a.path, a.kv_ctx)
    print(as_json(info) if a.json else render(info))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from transact_edge.loading import load

    if a.format == "gguf":
        from transact_edge.exporters.gguf import GGUFExportOptions, export, verify

        out = export(GGUFExportOptions(a.path, a.outtype or "f16", a.outfile))
        kind = a.outtype or "f16"
    elif a.format == "onnx":
        from transact_edge.exporters.onnx import ONNXExportOptions, export, verify

        out = export(ONNXExportOptions(a.path, a.outfile, a.dtype, a.quantize))
        kind = a.quantize or a.dtype
    else:
        raise UserError(f"unknown --format {a.format!r}; choose from gguf, onnx")
    size = sum(f.stat().st_size for f in out.parent.glob(out.name + "*"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {kind})")
    if not a.verify:
        return 0
    loaded = load(a.path)
    result = verify(out, loaded.model, loaded.tokenizer, kind)
    print(result.line())
    return 1 if result.passed is False else 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The whole chain on the embedded model with a budget that fits a few minutes on 2 cores."""
    from transact_edge.prune import prune

    opts = _prune_options(a)
    print(f"demo: pruning {opts.model} to {opts.widths.kv_heads} KV heads and MLP x{opts.widths.mlp_ratio} "
          f"in {opts.shots} shots, {opts.train_tokens} recovery tokens, writing {opts.out}", flush=True)
    report = prune(opts)
    print(_summary_table({"dense": report["dense"], "pruned": report["pruned"]}, report))

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
    print(f"\n{path.name}: {v.line()}")

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
        if a.runtime != "torch" and not Path(model).is_file():
            raise UserError(f"model file not found: {model}")
    with open_device(a.device, tuple(a.ssh_option), a.target) as device:
        report = bench.run(a.models, a.runtime, tests, a.threads, a.reps, device, PROFILES.get(a.profile), a.greedy)
    print(bench.render(report, a.output), end="")
    return 0


def cmd_build_llama(a: argparse.Namespace) -> int:
    from transact_edge import llamabuild

    out = llamabuild.build(a.target, a.ndk, a.jobs, a.force)
    print(f"llama.cpp {llamabuild.version()} ({a.target}): " + ", ".join(str(out / t) for t in (*llamabuild.TOOLS, "membw")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transact-edge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model with TransAct")
    _add_prune_args(p)
    d = p.add_argument_group("several GPUs (or CPU processes): recovery training through torch.distributed")
    d.add_argument("--launcher", help="start --processes copies of this command with accelerate or torchrun")
    d.add_argument("--processes", type=int, help="processes to launch (default: the visible GPUs, at least 2)")
    d.add_argument("--sharding", default="ddp", help="ddp (replicated weights) or fsdp (weights, gradients and "
                   "AdamW state sharded over the processes)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="evaluate a model")
    p.add_argument("path", help="checkpoint directory, .gguf file or embedded name")
    p.add_argument("--ppl", action="store_true", help="perplexity on held-out text")
    p.add_argument("--text", default="wiki", help="'wiki' (shipped held-out pages) or a .txt/.jsonl file")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, help="default: the window (disjoint windows)")
    p.add_argument("--max-tokens", type=int, help="cap on tokens read from the text")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--runtime", default="torch", help="torch, onnxruntime or llama.cpp")
    p.add_argument("--onnx", type=Path, help="the ONNX graph exported from PATH (with --runtime onnxruntime)")
    p.add_argument("--gguf", type=Path, help="the GGUF exported from PATH (with --runtime llama.cpp)")
    p.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated (offline: "
                   "transact_wiki_lastword, or tasks whose data is in the local datasets cache)")
    p.add_argument("--lm-eval-limit", type=_positive_int, help="examples per task")
    p.add_argument("--lm-eval-include", type=Path, help="a directory of extra lm-eval task YAMLs")
    p.add_argument("--chat-agreement", nargs="?", const="source", metavar="REFERENCE",
                   help="how often greedy answers to fixed chat prompts start like REFERENCE's (default: the "
                        "source model in transact.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint to GGUF for llama.cpp")
    p.add_argument("path", help="checkpoint directory (pruned or not) or embedded name")
    p.add_argument("--format", default="gguf", help="gguf or onnx")
    p.add_argument("--outtype", help="GGUF: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q4_k_m, q5_k_m, q6_k")
    p.add_argument("--dtype", default="fp32", help="ONNX: fp32 or fp16")
    p.add_argument("--quantize", help="ONNX: int8 (dynamic quantization by onnxruntime)")
    p.add_argument("--outfile", type=Path, help="default: {checkpoint}-{outtype}.gguf / {checkpoint}-{dtype}.onnx")
    p.add_argument("--verify", action="store_true", help="compare the runtime with PyTorch on held-out text")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="per-layer widths, parameters and KV bytes of a checkpoint or GGUF")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kv-ctx", type=int, default=4096,
                   help="GGUF: context for which llama.cpp reports its KV-cache size (0: skip)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="llama-bench-style speed, KV-cache and memory of models on a device")
    p.add_argument("models", nargs="+", metavar="MODEL", help=".gguf (llama.cpp), .onnx (onnxruntime), "
                   "checkpoint dir or embedded name (torch)")
    p.add_argument("--runtime", default="llama.cpp", help="llama.cpp (default), onnxruntime or torch")
    p.add_argument("-p", "--n-prompt", default="512", help="prompt lengths, comma-separated (0: none)")
    p.add_argument("-n", "--n-gen", default="128", help="generation lengths, comma-separated (0: none)")
    p.add_argument("-d", "--n-depth", default="0", help="tokens already in the KV cache, comma-separated")
    p.add_argument("-pg", action="append", default=[], metavar="P,N",
                   help="prompt of P tokens then N generated, timed together (repeatable; latency)")
    p.add_argument("-t", "--threads", type=_positive_int, help="default: the profile's or all cores")
    p.add_argument("-r", "--reps", type=_positive_int, default=5)
    p.add_argument("-o", "--output", default="md", help="md, json or csv")
    p.add_argument("--device", default="local", help="local, ssh://user@host[:port], adb[:serial], qemu-arm64")
    p.add_argument("--profile", help="device profile (threads, context, memory cap): " + ", ".join(PROFILES))
    p.add_argument("--target", help="llama.cpp build to run on the device (default: from its CPU)")
    p.add_argument("--greedy", type=int, default=32, metavar="N",
                   help="on other devices: check that N greedy tokens equal this machine's (0: skip)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to ssh as -o (e.g. IdentityFile=~/.ssh/board)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("build-llama", help="build llama.cpp's llama-bench/-completion/-perplexity for a target")
    p.add_argument("--target", default="native", help="native, aarch64-linux-gnu or android-arm64")
    p.add_argument("--ndk", help="Android NDK (android-arm64); default $ANDROID_NDK")
    p.add_argument("-j", "--jobs", type=_positive_int)
    p.add_argument("--force", action="store_true", help="rebuild even when a complete build is cached")
    p.set_defaults(func=cmd_build_llama)

    p = sub.add_parser("demo", help="prune the embedded SmolLM2-135M and compare before/after")
    _add_prune_args(p)
    p.set_defaults(func=cmd_demo, out=Path("transact-demo"), kv_heads=2, mlp_ratio=0.5, shots=2,
                   train_tokens=16384, calib_samples=16, seq_len=512, eval=True, eval_tokens=8192, force=True)
    for action in p._actions:  # --out has a default here
        if action.dest == "out":
            action.required = False
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher runs again
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(name)s: %(message)s")
        quiet = os.environ.get("RANK", "0") != "0"  # the other processes of a launched run
        logging.getLogger("transact_edge").setLevel(logging.WARNING if quiet else logging.INFO)
        import transformers

        transformers.utils.logging.disable_progress_bar()  # our own bars cover the long steps
        return args.func(args)
    except UserError as e:
        print(f"transact-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transact-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
