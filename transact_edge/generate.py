"""Recovery text sampled from the teacher (`--train-data generated --gen-tokens N`).

When the shipped text is too small to recover on, the dense model writes more (LLM-QAT, arXiv
2305.17888, distils on the teacher's own samples). Each sequence starts with `prompt_len` tokens
drawn from the calibration text and continues with `new_len` tokens sampled at temperature 1
(full distribution, no top-k/top-p; EOS is sampled like any token and the text goes on after it).
Sampling is Gumbel-max with a seeded generator, so the same seed gives the same tokens on the same
device. Decoding runs many sequences at once. All prompts have the same length, so attention needs
no mask and SDPA reads the grouped KV heads as they are; the KV cache is allocated at its final
length once and attention reads the filled part (transformers' DynamicCache copies itself to grow
each token). A static cache (fixed shapes, a mask) lets torch.compile capture the step as CUDA graphs.

The tokens (each sequence: prompt + samples + EOS) are cached in a directory under
$TRANSACT_EDGE_CACHE/generated (tokens.npy and generated.json, how they were made), keyed by the
teacher's weights, the prompts, the seed and the lengths, written atomically and reused by later runs.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from transact_edge.checkpoint import atomic_dir
from transact_edge.errors import UserError
from transact_edge.loading import CACHE
from transact_edge.shapes import head_dim, kv_bytes_per_token, layer_shapes

log = logging.getLogger(__name__)
TOKENS, META = "tokens.npy", "generated.json"


@dataclass(frozen=True)
class GenOptions:
    tokens: int                 # sampled tokens wanted (prompt tokens not counted)
    seed: int = 0
    prompt_len: int = 16        # calibration tokens that start each sequence
    new_len: int = 256          # tokens sampled per sequence
    batch: int = 0              # sequences decoded at once (0: as many as half the free GPU memory holds, at
                                # most 8192; 16 on the CPU)
    temperature: float = 1.0
    compile: bool = False       # torch.compile the decoding step (CUDA graphs on a GPU; static cache)
    cache: str = "preallocated"  # preallocated: buffers of the final length, attention reads the filled part
                                # (no padding, so no mask, and SDPA reads grouped KV heads as they are);
                                # dynamic: transformers' DynamicCache, which copies itself to grow each token;
                                # static: fixed shapes with a mask, for torch.compile

CACHES = ("preallocated", "dynamic", "static")


def check(opts: GenOptions) -> None:
    if opts.tokens < 1:
        raise UserError(f"--train-data generated needs --gen-tokens N > 0, got {opts.tokens}")
    if opts.cache not in CACHES:
        raise UserError(f"unknown --gen-cache {opts.cache!r} (choose from {', '.join(CACHES)})")
    if opts.prompt_len < 1 or opts.new_len < 1:
        raise UserError(f"--gen-len must be at least 1, got {opts.new_len}")


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of the weights that is cheap for any size: every tensor's name, shape and a strided sample."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def prompts(ids: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) windows of the calibration stream at seeded random offsets."""
    if ids.numel() <= length:
        raise UserError(f"calibration text has {ids.numel()} tokens, too few for prompts of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return ids[starts[:, None] + torch.arange(length)]


def _gumbel_argmax(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """One sample per row from softmax(logits / T): argmax of logits / T + Gumbel noise, where the
    noise -log(E) comes from E ~ Exp(1). In place: at 8192 rows x 49152 a pass is 1.6 GB."""
    scores = torch.empty(logits.shape, device=logits.device).exponential_(generator=gen)
    scores.clamp_(min=torch.finfo(scores.dtype).tiny).log_()  # E = 0 would be a certain pick
    return scores.neg_().add_(logits, alpha=1 / temperature).argmax(dim=-1)


def _preallocated(config, max_len: int):
    """A DynamicCache whose layers write into buffers of `max_len` and hand attention a view of the
    filled part, instead of growing by torch.cat (at batch 8192 a step copied the whole ~26 GB cache)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class Layer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                b, h, _, d = key_states.shape
                self.buffers = key_states.new_empty(2, b, h, max_len, d)
                self.length = 0
            end = self.length + key_states.shape[-2]
            self.buffers[0, :, :, self.length:end] = key_states
            self.buffers[1, :, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.buffers[0, :, :, :end], self.buffers[1, :, :, :end]
            return self.keys, self.values

    cache = DynamicCache(config=config)
    cache.layers = [Layer() for _ in cache.layers]
    return cache


@torch.inference_mode()
def sample(model, prompt: torch.Tensor, new_len: int, gen: torch.Generator, temperature: float = 1.0,
           cache: str = "preallocated", step=None) -> torch.Tensor:
    """(B, new_len) tokens sampled after `prompt` (B, P) through a KV cache of kind `cache`; `step`:
    the decoding forward (perhaps compiled), else model.forward."""
    from transformers import DynamicCache, StaticCache

    b, p = prompt.shape
    device = prompt.device
    # transformers renamed `past_key_values` to `cache` in 5.2x; take whichever this version has
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    made = {"preallocated": lambda: _preallocated(model.config, p + new_len),
            "dynamic": lambda: DynamicCache(config=model.config),
            "static": lambda: StaticCache(config=model.config, max_cache_len=p + new_len)}
    kv = {key: made[cache]()}
    decode = step or model.forward
    logits = model(input_ids=prompt, cache_position=torch.arange(p, device=device), use_cache=True,
                   **kv).logits[:, -1]  # (B, V)
    out = torch.empty(b, new_len, dtype=torch.long, device=device)
    for i in range(new_len):
        out[:, i] = _gumbel_argmax(logits, temperature, gen)
        if i + 1 < new_len:
            pos = torch.tensor([p + i], device=device)
            logits = decode(input_ids=out[:, i:i + 1], cache_position=pos, use_cache=True, **kv).logits[:, -1]
    return out


def auto_batch(model, length: int, device: torch.device) -> int:
    """Sequences whose KV cache fits in half the free GPU memory (decoding is launch-bound: bigger is
    faster; measured on an H200 for SmolLM2: 1024 -> 53K, 4096 -> 142K, 8192 -> 173K new tok/s)."""
    if device.type != "cuda":
        return 16
    cfg = model.config
    per_seq = kv_bytes_per_token(layer_shapes(cfg), head_dim(cfg)) * length  # K and V, bf16
    per_seq += 4 * cfg.vocab_size * 3  # float32 logits, noise and scores of one step
    return max(1, min(8192, int(torch.cuda.mem_get_info(device)[0] * 0.5 // per_seq)))


def generate(model, calib_ids: torch.Tensor, eos: int, opts: GenOptions) -> tuple[np.ndarray, dict]:
    """The token stream (prompt + samples + EOS per sequence) and how fast the samples came."""
    device = next(model.parameters()).device
    batch = opts.batch or auto_batch(model, opts.prompt_len + opts.new_len, device)
    n_seq = math.ceil(opts.tokens / opts.new_len)
    starts = prompts(calib_ids, n_seq, opts.prompt_len, opts.seed)
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    step = torch.compile(model.forward, mode="reduce-overhead", dynamic=False) if opts.compile else None
    rows, sampled, laps = [], 0, [time.perf_counter()]
    for chunk in tqdm(starts.split(batch), desc="generating", unit="batch", leave=False):
        new = sample(model, chunk.to(device), opts.new_len, gen, opts.temperature, opts.cache, step)
        eos_col = torch.full((chunk.shape[0], 1), eos, dtype=torch.long)
        rows.append(torch.cat([chunk, new.cpu(), eos_col], dim=1))  # .cpu() waits for the batch: laps are real
        sampled += new.numel()
        laps.append(time.perf_counter())
    seconds = laps[-1] - laps[0]
    dtype = np.uint16 if model.config.vocab_size <= 1 << 16 else np.int32
    tokens = torch.cat(rows).reshape(-1).numpy().astype(dtype)
    stats = {"sampled_tokens": sampled, "sequences": n_seq, "seconds": seconds, "new_tokens_per_s": sampled / seconds,
             "batch": batch, "device": str(device),
             # each batch's seconds: a slow first one is warm-up, slow later ones the device itself
             "batch_seconds": [round(b - a, 3) for a, b in zip(laps, laps[1:])]}
    log.info("generated %d tokens in %.1f s: %.0f new tok/s", sampled, seconds, sampled / seconds)
    return tokens, stats


def cache_dir(teacher_id: str, calib_ids: torch.Tensor, opts: GenOptions) -> Path:
    key = {"teacher": teacher_id, "calib": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest()[:16],
           **{k: v for k, v in asdict(opts).items() if k not in ("batch", "compile", "cache")}}
    return CACHE / "generated" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def ensure(model, calib_ids: torch.Tensor, eos: int, opts: GenOptions) -> tuple[Path, dict]:
    """The cached token file for these options, generated first if it is not there."""
    entry = cache_dir(fingerprint(model), calib_ids, opts)
    if (entry / META).is_file():
        return entry / TOKENS, json.loads((entry / META).read_text()) | {"cached": True}
    tokens, stats = generate(model, calib_ids, eos, opts)
    stats |= {"options": asdict(opts), "tokens_in_file": int(tokens.size)}
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(entry, force=True) as tmp:
        np.save(tmp / TOKENS, tokens)
        (tmp / META).write_text(json.dumps(stats))
    return entry / TOKENS, stats | {"cached": False}
