"""Does the pruned chat model still answer like the dense one? Greedy answers to fixed chat prompts.

SmolLM2-135M-Instruct is a chat model; perplexity on Wikipedia says little about its answers. Each
prompt below goes through the tokenizer's own chat template; both models answer greedily, and a
prompt counts as agreeing when the pruned model's first `n_tokens` answer tokens equal the dense
model's. `transact-edge eval PRUNED --chat-agreement [REFERENCE]` (default reference: the source
recorded in transact.json).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
    "List the planets of the solar system.",
    "What does a CPU do?",
    "Write one sentence about autumn.",
    "How do I make a cup of tea?",
    "What is the largest ocean on Earth?",
)


@dataclass
class Agreement:
    agreeing: int
    prompts: int
    n_tokens: int
    answers: list[tuple[str, str, str]]   # (prompt, reference answer, model answer)
    mean_prefix: float = 0.0              # answer tokens before the first difference, on average (0..n_tokens)

    def line(self) -> str:
        return (f"chat agreement: {self.agreeing}/{self.prompts} greedy answers start with the reference's "
                f"first {self.n_tokens} tokens ({100 * self.agreeing / self.prompts:.0f}%); "
                f"{self.mean_prefix:.1f} tokens agree before the first difference on average")


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts=PROMPTS, n_tokens: int = 8) -> torch.Tensor:
    """(n_prompts, n_tokens) greedy answer tokens, all prompts in one left-padded batch."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token = tokenizer.pad_token
    if pad_token is None:  # a tokenizer read from GGUF may have none; left padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        if pad_token is None:
            tokenizer.pad_token = None
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc.to(device), do_sample=False, max_new_tokens=n_tokens, pad_token_id=pad)
    answer = out[:, enc["input_ids"].shape[1]:].cpu()  # answers that ended early are padded
    return torch.nn.functional.pad(answer, (0, n_tokens - answer.shape[1]), value=pad)


def agreement(model, reference, tokenizer, prompts=PROMPTS, n_tokens: int = 8) -> Agreement:
    ours, theirs = (greedy_answers(m, tokenizer, prompts, n_tokens) for m in (model, reference))
    same = (ours == theirs).all(dim=1)
    prefix = (ours == theirs).int().cumprod(dim=1).sum(dim=1).float().mean().item()
    answers = [(p, tokenizer.decode(t, skip_special_tokens=True), tokenizer.decode(o, skip_special_tokens=True))
               for p, t, o in zip(prompts, theirs, ours)]
    return Agreement(int(same.sum()), len(prompts), n_tokens, answers, prefix)
