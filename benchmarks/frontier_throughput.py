"""`python benchmarks/frontier.py throughput`: sampling new tok/s for each KV cache and batch; KD vs LM
training steps at the 50% widths, with the losses eager and fused (torch.compile), the teacher plain and
compiled. One JSON file each under benchmarks/results/."""
from __future__ import annotations

import json
import sys
import time

from _common import machine
from frontier import RESULTS, SMOLLM2, WIDTHS


def throughput(a) -> None:
    """Both measurements (the second unless --no-steps) on SmolLM2 (or its config with random weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transact_edge import corpus
    from transact_edge.loading import load

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine() | {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
                        "command": " ".join(sys.argv)}
    if a.random_weights:  # the speed of sampling and of a step does not depend on the weights' values
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(dev)
        ids, eos = torch.randint(0, SMOLLM2["vocab_size"], (100_000,)), SMOLLM2["eos_token_id"]
        info["weights"] = "random, SmolLM2-135M's config"
    else:
        loaded = load(a.model)
        model, ids, eos = loaded.model, corpus.stream(loaded.tokenizer), loaded.tokenizer.eos_token_id
    _sampling(a, model, ids, eos, dev, info)
    if not a.no_steps:
        _steps(a, model, ids, dev, info)


def _sampling(a, model, ids, eos: int, dev, info: dict) -> None:
    """Sampling new tok/s for each KV cache and batch, and whether each cache samples the first one's tokens."""
    import torch

    from transact_edge import generate

    gen_rows, first = [], {}
    for cache in a.gen_caches:
        for batch in a.gen_batches:
            def opts(rounds: int):
                return generate.GenOptions(tokens=batch * a.gen_len * rounds, new_len=a.gen_len, batch=batch,
                                           cache=cache, compile=cache == "static")
            warm, _ = generate.generate(model.bfloat16(), ids, eos, opts(1))  # warm-up (and compile)
            torch.cuda.synchronize(dev) if dev.type == "cuda" else None
            _, stats = generate.generate(model, ids, eos, opts(3))
            reference = first.setdefault(batch, warm)  # the first cache's tokens: do the others sample the same?
            gen_rows.append({"cache": cache, "compile": cache == "static", "new_len": a.gen_len, **stats,
                             "same_tokens_as": a.gen_caches[0], "same_tokens": float((warm == reference).mean())})
            print(json.dumps(gen_rows[-1]), flush=True)
    (RESULTS / "generation_throughput.json").write_text(json.dumps({"machine": info, "rows": gen_rows}, indent=1))


def _steps(a, model, ids, dev, info: dict) -> None:
    """KD vs LM recovery steps (tok/s) of a tx50-wide student, losses eager and fused, teacher plain and compiled."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transact_edge import corpus
    from transact_edge.distill import LossOptions, Teacher
    from transact_edge.loading import load
    from transact_edge.recovery import RecoveryOptions, train
    from transact_edge.traindata import from_windows

    # a student of the tx50 widths (uniform, so a plain Llama of that config): steps cost the same as a pruned one's
    tx50 = WIDTHS["tx50"]
    student_cfg = LlamaConfig(**SMOLLM2 | dict(num_attention_heads=tx50["heads"], num_key_value_heads=tx50["kv_heads"],
                                               intermediate_size=tx50["mlp"]))
    windows = corpus.windows(ids, 1024, 32 * 24, seed=0)
    variants = [("lm", False, False), ("lm", True, False), ("kd", False, False), ("kd", True, False),
                ("kd", True, True)]
    teachers = {c: Teacher(LlamaForCausalLM(model.config).to(dev) if a.random_weights else load(a.model).model,
                           dev, compile=c) for c in (False, True)}
    rows = []
    for loss, fused, compiled in variants * 2:  # twice: the first round warms up (and compiles)
        torch.manual_seed(0)
        student = LlamaForCausalLM(student_cfg).to(dev)
        t = time.perf_counter()
        train(student, from_windows(windows), 24, RecoveryOptions(LossOptions(loss, compile=fused), 32, 1e-4),
              teacher=teachers[compiled] if loss == "kd" else None)
        torch.cuda.synchronize(dev) if dev.type == "cuda" else None
        rows.append({"loss": loss, "fused_loss": fused, "compiled_teacher": compiled,
                     "tok_s": windows.numel() / (time.perf_counter() - t)})
    rows = rows[len(variants):]
    best_lm = max(r["tok_s"] for r in rows if r["loss"] == "lm")
    for r in rows:
        r["over_best_lm"] = r["tok_s"] / best_lm
        print(json.dumps(r), flush=True)
    (RESULTS / "recovery_throughput.json").write_text(json.dumps({"machine": info, "batch": "32 x 1024", "steps": 24,
                                                                  "rows": rows}, indent=1))
