"""The per-model worker: tokens/s of each test in this process, through transact_edge.runtimes.
Run as `python -m transact_edge.bench JOB` (one JSON job in argv, one JSON line out)."""
from __future__ import annotations

import time

import numpy as np

from transact_edge.memory import own_peak_rss_mib
from transact_edge.runtimes import open_runtime


def measure(runtime: str, model: str, cases: list[tuple[int, int, int]], threads: int, reps: int,
            vocab: int, seed: int = 0) -> dict:
    """Tokens/s samples per case, in this process. Random tokens, as llama-bench uses."""
    n_ctx = max(p + n + d for p, n, d in cases)
    before = own_peak_rss_mib()  # the interpreter and its imports
    session = open_runtime(runtime, model, n_ctx, threads, logits=False)
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
