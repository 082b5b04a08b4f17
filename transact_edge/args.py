"""The command line's grammar: one parser, a function per command's arguments. cli.py runs them.
Imports nothing heavy, so that `transact-edge --help` answers at once."""
from __future__ import annotations

import argparse
from pathlib import Path

from transact_edge.devices import PROFILES
from transact_edge.errors import UserError

DESCRIPTION = "TransAct structured pruning of LLaMA-family models, exported to GGUF and ONNX for the edge"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse's default prints the usage too)
        raise UserError(message)


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _round_to(s: str) -> int | str:
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', got {s!r}") from None


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
    w.add_argument("--round-to", type=_round_to, default=32, help="MLP widths from --mlp-ratio in multiples of this; "
                   "auto: ratios rounded up so that every cut row (ffn_down, attn_output) is a multiple of 256 where "
                   "the model allows, as llama.cpp's K-/i-quants need")
    w.add_argument("--per-layer", action="store_true", help="let widths differ per layer (salience allocation)")
    w.add_argument("--plan", metavar="TRANSACT_JSON", help="replay the cut recorded in a transact.json (or its "
                   "directory) on this model of the same shapes: no calibration unless --reconstruct (e.g. base "
                   "model's plan -> instruct)")
    w.add_argument("--reconstruct", action="store_true", help="at each cut, refit the kept columns of o_proj and "
                   "down_proj by ridge regression so each layer reproduces its output before the cut on the "
                   "calibration tokens (ridge strength chosen on held-apart windows; not with --stream)")
    w.add_argument("--imatrix", metavar="FILE", help="rank heads and channels by an importance matrix made for this "
                   "model (llama-imatrix's, or export --imatrix auto's): its attn_output and ffn_down sums are "
                   "TransAct's statistic, so no calibration pass; one shot; the output gets the matrix cut to the "
                   "kept columns (imatrix.gguf, approximate) for export --imatrix")
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
    _add_recovery_args(p.add_argument_group("recovery (with --train-tokens > 0)"))
    w.add_argument("--drop-layers", type=_positive_int, default=0, help="depth pruning: remove the N layers "
                   "that change the hidden state least (ShortGPT block influence) before the first shot")
    p.add_argument("--eval", action="store_true", help="held-out perplexity before and after")
    p.add_argument("--eval-tokens", type=int, help="cap on held-out tokens scored")
    p.add_argument("--resume", action="store_true", help="continue after the last finished shot")
    p.add_argument("--stream", action="store_true", help="one shot, layer by layer from the safetensors files: "
                   "memory of one layer plus the calibration activations (7B-class models on a 24 GiB machine)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _add_recovery_args(r: argparse._ArgumentGroup) -> None:
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
    r.add_argument("--gen-cache", default="preallocated",
                   help="KV cache of sampling: preallocated, dynamic (transformers' DynamicCache), static (compiled)")
    r.add_argument("--val-windows", type=_positive_int, default=8,
                   help="validation windows held apart from the first training source (0: none)")
    r.add_argument("--val-every", type=_positive_int, default=0, help="steps between validation losses "
                   "(0: 20 per shot)")
    r.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save the training state inside a shot at least this often (for --resume)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transact-edge", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_prune(sub.add_parser("prune", help="prune a model with TransAct"))
    _add_eval(sub.add_parser("eval", help="evaluate a model"))
    _add_export(sub.add_parser("export", help="export a checkpoint to GGUF for llama.cpp, or to ONNX"))
    p = sub.add_parser("inspect", help="per-layer widths, parameters and KV bytes of a checkpoint or GGUF")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kv-ctx", type=int, default=4096,
                   help="GGUF: context for which llama.cpp reports its KV-cache size (0: skip)")
    _add_bench(sub.add_parser("bench", help="llama-bench-style speed, KV-cache and memory of models on a device"))
    p = sub.add_parser("build-llama", help="build llama.cpp's llama-bench/-completion/-perplexity/-quantize/-imatrix "
                       "for a target")
    p.add_argument("--target", default="native", help="native, aarch64-linux-gnu or android-arm64")
    p.add_argument("--ndk", help="Android NDK (android-arm64); default $ANDROID_NDK")
    p.add_argument("-j", "--jobs", type=_positive_int)
    p.add_argument("--force", action="store_true", help="rebuild even when a complete build is cached")
    _add_demo(sub.add_parser("demo", help="prune the embedded SmolLM2-135M and compare before/after"))
    return parser


def _add_prune(p: argparse.ArgumentParser) -> None:
    _add_prune_args(p)
    d = p.add_argument_group("several GPUs (or CPU processes): recovery training through torch.distributed")
    d.add_argument("--launcher", help="start --processes copies of this command with accelerate or torchrun")
    d.add_argument("--processes", type=int, help="processes to launch (default: the visible GPUs, at least 2)")
    d.add_argument("--sharding", default="ddp", help="ddp (replicated weights) or fsdp (weights, gradients and "
                   "AdamW state sharded over the processes)")


def _add_eval(p: argparse.ArgumentParser) -> None:
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


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory (pruned or not) or embedded name")
    p.add_argument("--format", default="gguf", help="gguf or onnx")
    p.add_argument("--outtype", help="GGUF, in llama-quantize's names (any case): F32, F16 (default), BF16, Q8_0, "
                   "Q5_1, Q5_0, Q4_1, Q4_0, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, IQ1_S, IQ1_M, IQ2_XXS/XS/S/M, "
                   "IQ3_XXS/XS/S/M, IQ4_NL, IQ4_XS (all but the first eight made by the built llama-quantize)")
    p.add_argument("--imatrix", metavar="FILE|auto", help="GGUF: importance matrix for llama-quantize (llama-imatrix's "
                   "GGUF or .dat), or auto: one calibration pass of this model over the shipped pages")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="GGUF: ggml type of token_embd (llama-quantize's option)")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="GGUF: ggml type of the output head (llama-quantize's option)")
    p.add_argument("--dtype", default="fp32", help="ONNX: fp32 or fp16")
    p.add_argument("--quantize", help="ONNX: int8 (dynamic, onnxruntime) or int4 (weight-only MatMulNBits)")
    p.add_argument("--block-size", type=int, default=32, help="ONNX int4: weights per quantization block (32)")
    p.add_argument("--int4-algo", default="hqq", help="ONNX int4: hqq (data-free fit, keeps perplexity; default) or "
                   "rtn (round-to-nearest: onnxruntime's faster kernels, loses more)")
    p.add_argument("--outfile", type=Path, help="GGUF: default {checkpoint}-{outtype}.gguf; ONNX: a directory "
                   "(default {checkpoint}-onnx-{dtype}: model.onnx, genai_config.json, tokenizer), or a .onnx path "
                   "with those files beside it")
    p.add_argument("--verify", action="store_true", help="compare the runtime with PyTorch on held-out text")


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help=".gguf (llama.cpp), .onnx (onnxruntime), "
                   "checkpoint dir or embedded name (torch)")
    p.add_argument("--runtime", default="llama.cpp", help="llama.cpp (default), onnxruntime, onnxruntime-genai (an exported directory) or torch")
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


def _add_demo(p: argparse.ArgumentParser) -> None:
    _add_prune_args(p)
    p.set_defaults(out=Path("transact-demo"), kv_heads=2, mlp_ratio=0.5, shots=2,
                   train_tokens=3072, batch_size=2, calib_samples=16, seq_len=512, eval=True, eval_tokens=8192,
                   reconstruct=True,  # the refit at the cut: pruned perplexity 1097 vs 1858 without (2026-12-07)
                   val_windows=2,  # validated after each of its 3 steps: 8 windows took 94 s of a 407 s prune
                   force=True)  # recovery: 1 + 2 steps of 2 x 512 tokens (~30 s each on 2 cores)
    for action in p._actions:  # --out has a default here
        if action.dest == "out":
            action.required = False
