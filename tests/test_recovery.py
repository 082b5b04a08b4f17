"""Recovery that heals: distillation, streamed training data, teacher samples, schedules, depth pruning."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model
from transact_edge import depth, distill, generate, recovery, traindata
from transact_edge.plan import WidthRequest
from transact_edge.prune import PruneOptions, prune


def test_kd_loss_is_zero_for_the_same_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 50)
    assert distill.kd_loss(logits, logits.clone()).abs().item() < 1e-6
    assert distill.kd_loss(logits, logits + 3.0).abs().item() < 1e-5  # a shift is the same distribution
    assert distill.kd_loss(logits, torch.randn(2, 5, 50)).item() > 0.1
    assert distill.kd_loss(logits, torch.randn(2, 5, 50), temperature=2.0).item() > 0


def test_compiled_losses_match_eager_in_value_and_gradient():
    """The fused (torch.compile) losses GPUs train with, compiled here on the CPU: same numbers."""
    student, teacher, ids = torch.randn(2, 16, 300, requires_grad=True), torch.randn(2, 16, 300), torch.randint(0, 300, (2, 16))
    for temperature in (1.0, 2.0):
        eager = distill.kd_loss(student, teacher, temperature)
        fused = distill._compiled(distill.kd_loss)(student, teacher, temperature)
        (g_eager,), (g_fused,) = torch.autograd.grad(eager, student), torch.autograd.grad(fused, student)
        assert torch.allclose(eager, fused, rtol=1e-5) and torch.allclose(g_eager, g_fused, atol=1e-8)
    assert torch.allclose(distill.lm_loss(student, ids), distill._compiled(distill.lm_loss)(student, ids), rtol=1e-5)
    assert distill.fused(distill.kd_loss, torch.device("cpu")) is distill.kd_loss  # the CPU runs them eagerly


def test_kd_of_a_model_with_itself_is_zero_and_only_the_student_learns():
    student = tiny_model("llama").train()
    teacher = distill.Teacher(copy.deepcopy(student), torch.device("cpu"))
    ids = torch.randint(0, 1000, (2, 16))
    same = distill.recovery_loss(student, ids, distill.LossOptions("kd"), teacher)
    assert same.abs().item() < 1e-5
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    loss = distill.recovery_loss(student, ids, distill.LossOptions("kd", alpha=0.5), teacher)
    assert loss.item() > 1e-3
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert student.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_generation_is_seeded_and_cached(tmp_path, monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0))
    opts = generate.GenOptions(tokens=96, seed=3, new_len=12, batch=4)
    a, stats = generate.generate(model, ids, 2, opts)
    b, _ = generate.generate(model, ids, 2, opts)
    c, _ = generate.generate(model, ids, 2, generate.GenOptions(tokens=96, seed=4, new_len=12, batch=4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for cache in ("dynamic", "static"):  # the same samples through every KV cache
        other, _ = generate.generate(model, ids, 2, generate.GenOptions(tokens=96, seed=3, new_len=12, batch=4,
                                                                        cache=cache))
        assert np.array_equal(a, other), cache
    assert stats["sampled_tokens"] == 96 and a.size == 8 * (16 + 12 + 1)  # prompt + samples + EOS per sequence
    assert len(stats["batch_seconds"]) == 2 and sum(stats["batch_seconds"]) <= stats["seconds"] + 0.01
    rows = a.reshape(8, 29)
    assert (rows[:, -1] == 2).all()
    # a row's samples follow its prompt: the first sampled token is a sample of the model after the prompt
    assert len({tuple(r) for r in rows[:, 16:28].tolist()}) == 8
    monkeypatch.setattr(generate, "CACHE", tmp_path)
    path, first = generate.ensure(model, ids, 2, opts)
    again, second = generate.ensure(model, ids, 2, opts)
    assert path == again and not first["cached"] and second["cached"]
    assert np.array_equal(np.load(path), a)


def _text_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    a.write_text("".join(json.dumps({"text": f"alpha document {i} " * 20}) + "\n" for i in range(30)))
    b.write_text("".join(f"beta line {i} with some words\n" for i in range(400)))
    return a, b


def test_mixture_keeps_shares_counts_epochs_and_resumes(tmp_path, tokenizer):
    a, b = _text_files(tmp_path)
    spec = traindata.parse(f"{a}@1,{b}@3")
    assert [s.weight for s in spec] == [1.0, 3.0]

    def mixture():
        streams = [traindata.TokenStream(s.name, 32, tokenizer) for s in spec]
        return traindata.Mixture(streams, [s.weight for s in spec], seed=1)

    m = mixture()
    val = m.streams[0].hold_apart(2)
    first = m.take(40)
    rep = m.report()
    assert rep[0]["tokens_read"] + rep[1]["tokens_read"] == 40 * 32
    assert abs(rep[0]["tokens_read"] - 10 * 32) <= 32  # 1:3, to within one window
    state = m.state()
    later = m.take(400)  # past the end of the small source: epochs wrap
    rep = m.report()
    assert rep[0]["wraps"] >= 1 and rep[0]["epochs"] > 1
    # the validation windows are never trained on, in any epoch
    trained = {tuple(w) for w in torch.cat([first, later]).tolist()}
    assert not trained & {tuple(w) for w in val.tolist()}
    resumed = mixture()
    resumed.streams[0].hold_apart(2)
    resumed.restore(json.loads(json.dumps(state)))
    assert torch.equal(resumed.take(400), later)


def test_a_1gb_jsonl_streams_with_bounded_memory(tmp_path, pruned_dirs):
    big = tmp_path / "big.jsonl"
    line = (json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 200}) + "\n").encode()
    with big.open("wb") as f:
        for _ in range((1 << 30) // len(line) + 1):
            f.write(line)
    assert big.stat().st_size >= 1 << 30
    code = textwrap.dedent(f"""
        import resource
        from transformers import AutoTokenizer
        from transact_edge import traindata
        tok = AutoTokenizer.from_pretrained({str(pruned_dirs['uniform'])!r})
        m = traindata.Mixture([traindata.TokenStream({str(big)!r}, 512, tok)], [1.0], 0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(20):
            m.take(16)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(before // 1024, after // 1024, m.report()[0]["tokens_read"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after, read = map(int, r.stdout.split())
    assert read == 20 * 16 * 512
    assert after - before < 200, f"streaming grew the peak RSS by {after - before} MiB"


def test_schedules_spread_the_budget():
    assert recovery.tokens_per_shot(1000, 4, "linear") == [100, 200, 300, 400]
    assert recovery.tokens_per_shot(1000, 4, "equal") == [250] * 4
    final = recovery.tokens_per_shot(1000, 3, "final")
    assert final[-1] == 800 and final[0] == final[1] == 100
    assert recovery.tokens_per_shot(1000, 1, "final") == [1000]


def test_block_influence_finds_a_layer_that_does_nothing():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: an identity
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 1000, (2, 16))
    influence = depth.block_influence(model, ids, batch_size=1)
    assert depth.choose(influence, 1) == [1] and influence[1].abs() < 1e-6
    dropped = depth.drop(model, [1])
    assert dropped.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(dropped(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def _opts(src, out, **kw) -> PruneOptions:
    kw = dict(shots=2, train_tokens=12 * 64) | kw
    return PruneOptions(model=str(src), out=out, widths=WidthRequest(heads=3, kv_heads=1, mlp=64), calib_samples=4,
                        seq_len=64, batch_size=2, lr=1e-3, device="cpu", val_windows=2, **kw)


def test_kd_and_lm_recovery_report_what_they_did(tiny_llama_dir, tmp_path):
    kd = prune(_opts(tiny_llama_dir, tmp_path / "kd", schedule="final", drop_layers=1))
    rec = kd.shots[-1].recovery
    assert rec["loss"] == "kd" and rec["teacher"]["params"] > 0 and rec["validation"]
    assert rec["data"][0]["source"] == "wiki" and rec["data"][0]["tokens_read"] > 0
    assert kd.shots[0].depth["dropped"] and len(kd.pruned.layers) == 2
    assert kd.plan["layers"] == [il for il in range(3) if il not in kd.shots[0].depth["dropped"]]
    # final: 20% / 80% of 768 tokens, in whole steps of 2 x 64 tokens (at least one)
    assert [s.recovery["tokens"] for s in kd.shots] == [128, 512]
    lm = prune(_opts(tiny_llama_dir, tmp_path / "lm", recovery="lm"))
    assert "teacher" not in lm.shots[-1].recovery and lm.shots[-1].recovery["loss"] == "lm"


def test_resume_inside_a_shot_gives_the_uninterrupted_weights(tiny_llama_dir, tmp_path, monkeypatch):
    prune(_opts(tiny_llama_dir, tmp_path / "full"))
    real, calls = recovery.recovery_loss, []

    def dies_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # shot 1 takes 2 steps, shot 2 4: its third; checkpoints were written after every step
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(recovery, "recovery_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        prune(_opts(tiny_llama_dir, tmp_path / "resumed", checkpoint_minutes=0))
    live = tmp_path / ".resumed.partial" / "live"
    assert json.loads((live / "state.json").read_text())["shot"] == 2
    assert json.loads((live / "training.json").read_text())["step"] == 2
    monkeypatch.setattr(recovery, "recovery_loss", real)
    prune(_opts(tiny_llama_dir, tmp_path / "resumed", checkpoint_minutes=0, resume=True))
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (tmp_path / ".resumed.partial").exists()


def test_chat_agreement_counts_answers_that_start_alike(tokenizer):
    from transact_edge.chat import agreement

    model = tiny_model("llama")
    same = agreement(model, copy.deepcopy(model), tokenizer, n_tokens=4)
    assert same.agreeing == same.prompts == 16 and "16/16" in same.line() and same.mean_prefix == 4
    other = agreement(tiny_model("llama", seed=1), model, tokenizer, n_tokens=4)
    assert other.agreeing < other.prompts and len(other.answers) == 16 and other.mean_prefix < 4


def test_chat_agreement_needs_no_pad_token(tokenizer):
    """A tokenizer read from GGUF may have no pad token: the prompts are padded with EOS, the tokenizer is left as it was."""
    from transact_edge.chat import agreement

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    model = tiny_model("llama")
    assert agreement(model, copy.deepcopy(model), tok, n_tokens=2).agreeing == 16
    assert tok.pad_token is None and tok.padding_side == tokenizer.padding_side


def test_windows_are_shuffled_and_every_epoch_differently():
    rows = torch.arange(64 * 8).view(64, 8)  # window i holds 8i .. 8i+7
    m = traindata.from_windows(rows)
    first, second = m.take(64), m.take(64)
    assert sorted(first[:, 0].tolist()) == rows[:, 0].tolist()  # one epoch: every window once
    assert first[:, 0].tolist() != rows[:, 0].tolist() and first[:, 0].tolist() != second[:, 0].tolist()
    assert m.report()[0]["epochs"] == 2.0


def test_a_mixture_with_teacher_samples_trains_and_reports_both_sources(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "CACHE", tmp_path / "cache")
    report = prune(_opts(tiny_llama_dir, tmp_path / "out", train_data="wiki@1,generated@3", gen_tokens=512,
                         gen_len=32, shots=1))
    assert report.recovery.generated["sampled_tokens"] == 512 and not report.recovery.generated["cached"]
    data = {d["source"]: d for d in report.shots[0].recovery["data"]}
    assert set(data) == {"wiki", "generated"} and data["generated"]["weight"] == 0.75
    assert data["generated"]["tokens_read"] > data["wiki"]["tokens_read"] > 0
    assert len(list((tmp_path / "cache" / "generated").iterdir())) == 1


def test_a_teacher_with_another_vocabulary_is_refused(tiny_llama_dir, tmp_path, tokenizer):
    import transformers

    from transact_edge.errors import UserError

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=1000)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    with pytest.raises(UserError, match="vocabulary of 1000 tokens, the student 49152"):
        prune(_opts(tiny_llama_dir, tmp_path / "out", teacher=str(tmp_path / "teacher"), shots=1))
    assert not (tmp_path / "out").exists()


def test_prune_says_how_often_each_source_was_read(tiny_llama_dir, tmp_path, capsys):
    from transact_edge.cli import main

    text = tmp_path / "small.txt"
    text.write_text("".join(f"line {i} of a small text\n" for i in range(300)))  # ~2.4K tokens: epochs repeat
    assert main(["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--kv-heads", "1",
                 "--mlp", "64", "--train-tokens", "8192", "--train-data", str(text), "--calib-samples", "2",
                 "--seq-len", "64", "--batch-size", "4", "--device", "cpu", "--val-windows", "1"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("recovery (kd) read:"))
    epochs = float(line.split("(")[-1].split()[0])
    assert f"{text} 8,192 tokens" in line and epochs > 2
