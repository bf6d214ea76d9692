#!/usr/bin/env bash
# The initcheck matrix of issue 27: maskaudit and the PyTorch peer under compute-sanitizer with
# one suspect changed at a time, each run's error count and the kernels hit. Run on a GPU
# machine from a folder holding the release `maskaudit` (and initcheck_linear.py), inside a
# checkout (bench/gen.py, bench/peer.py, fixtures/ one level up). Logs land in $OUT.
set -uo pipefail
cd "$(dirname "$0")"
HERE=$PWD
ROOT=${ROOT:-$HERE/..}
OUT=${OUT:-$HERE/out}
JOBS=${JOBS:-6}
W=/tmp/initcheck
mkdir -p "$OUT" "$W/logs"
torch_lib="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MASKAUDIT_CACHE=off
compute-sanitizer --version | tail -1
python3 "$ROOT/bench/gen.py" model "$W/lm384.pt" --vocab 384 --width 64 --layers 2 --heads 2 \
    --max-pos 64 >/dev/null
python3 "$ROOT/bench/gen.py" data "$W/rows.jsonl" --rows 12 --min-len 8 --max-len 40 \
    --vocab 384 >/dev/null
M="./maskaudit check $W/lm384.pt $W/rows.jsonl --pad-id 0 --batch-size 4 --device cuda --quiet --format json"
P="python3 $ROOT/bench/peer.py $W/lm384.pt $W/rows.jsonl --pad-id 0 --batch-size 4 --device cuda"
LOSS="--loss $ROOT/fixtures/losses/reduce_then_mask.pt --loss-args shift_logits,targets,loss_mask"
NC="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
# name | tool | environment | command
cases=(
  "peer_tf32off|initcheck||$P --tf32 off"
  "peer_tf32on|initcheck||$P --tf32 on"
  "peer_bf16|initcheck||$P --dtype bfloat16"
  "linear_tf32off|initcheck||python3 initcheck_linear.py --tf32 off"
  "linear_tf32on|initcheck||python3 initcheck_linear.py --tf32 on"
  "linear_tf32on_nc|initcheck|$NC|python3 initcheck_linear.py --tf32 on"
  "linear_bf16|initcheck||python3 initcheck_linear.py --dtype bfloat16"
  "ma_default|initcheck||$M --dtype float32 --no-model-probe"
  "ma_tf32off|initcheck||$M --dtype float32 --tf32 off --no-model-probe"
  "ma_tf32off_probe|initcheck||$M --dtype float32 --tf32 off"
  "ma_tf32on_plain|initcheck|MASKAUDIT_OVERLAP=0 MASKAUDIT_FUSED_CE=0|$M --dtype float32 --no-model-probe"
  "ma_tf32off_plain|initcheck|MASKAUDIT_OVERLAP=0 MASKAUDIT_FUSED_CE=0|$M --dtype float32 --tf32 off --no-model-probe"
  "ma_tf32on_nc|initcheck|$NC|$M --dtype float32 --no-model-probe"
  "ma_tf32off_nc|initcheck|$NC|$M --dtype float32 --tf32 off --no-model-probe"
  "ma_tf32on_nothp|initcheck|THP_MEM_ALLOC_ENABLE=0|$M --dtype float32 --no-model-probe"
  "ma_tf32on_nomimalloc|initcheck||${M/.\/maskaudit/./maskaudit-nomi} --dtype float32 --no-model-probe"
  "ma_bf16|initcheck||$M --dtype bfloat16"
  "ma_loss_tf32on|initcheck||$M --dtype float32 $LOSS"
  "ma_loss_tf32off|initcheck||$M --dtype float32 --tf32 off $LOSS"
  "ma_accum_tf32off|initcheck||$M --dtype float32 --tf32 off --accum 2"
  "ma_tf32on_memcheck_nc|memcheck|$NC|$M --dtype float32 --no-model-probe"
  "peer_tf32on_memcheck_nc|memcheck|$NC|$P --tf32 on"
)
run_case() {
    IFS='|' read -r name tool envs cmd <<<"$1"
    local log="$W/logs/$name.log" start=$SECONDS
    # shellcheck disable=SC2086
    env $envs timeout "${RUN_TIMEOUT:-200}" compute-sanitizer --tool "$tool" --print-limit 3000 \
        --show-backtrace no $cmd >"$log" 2>&1
    local rc=$? errors
    errors=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$log" | grep -o '[0-9]*' | tail -1)
    local kernels
    kernels=$(grep -E '^=========     at ' "$log" | sed -E 's/^=========     at //; s/\+0x[0-9a-f]+$//' |
        sed -E 's/^void //' | cut -c1-60 | sort | uniq -c | sort -rn | head -3 |
        awk '{c=$1; $1=""; printf "%s×%s;", c, $0}')
    local ce
    ce=$(grep -o '"cross_entropy": *"[a-z+-]*"' "$log" | head -1)
    printf '%-26s rc=%-3s errors=%-7s %3ss %s %s\n' "$name" "$rc" "${errors:-?}" \
        "$((SECONDS - start))" "$ce" "$kernels"
}
export -f run_case
export W M P
printf '%s\n' "${cases[@]}" | xargs -d "\n" -P "$JOBS" -I{} bash -c 'run_case "$@"' _ {} |
    tee "$OUT/summary.txt"
tar czf "$OUT/logs.tgz" -C "$W" logs
