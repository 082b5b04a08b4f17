"""transact-edge bench: llama-bench-style speed, KV-cache memory, peak memory and roofline share.

Tests follow llama-bench: for each depth d, `ppP` times a P-token prompt and `tgN` times N
single-token decode steps, both after d tokens already in the KV cache (d is filled untimed).
Each model runs in its own process (llama.cpp's `llama-bench` when `build-llama` has built it for
the device's target, else a Python worker over llama-cpp-python, onnxruntime or torch), so peak
RSS is that process's own. The roofline for tg is the device's measured read bandwidth divided
by the bytes a token reads: every weight once (the token embedding only as the output head when
it is tied) plus depth x KV bytes per token.
"""
from transact_edge.bench.render import render
from transact_edge.bench.run import Report, run
from transact_edge.bench.spec import Tests, int_list, pair

__all__ = ["Report", "Tests", "int_list", "pair", "render", "run"]
