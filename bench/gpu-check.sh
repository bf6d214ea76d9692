#!/usr/bin/env bash
# `make gpu-check`'s GPU half: the CUDA tests, then every CUDA path of maskaudit under
# compute-sanitizer's four tools (memcheck, initcheck, racecheck, synccheck), each of which must
# end with 0 errors (docs/guide.md, "On a GPU").
#
# Runs from a folder holding the release `maskaudit` and the test binaries `cuda_ce` and
# `cuda_runtime` (`make gpu-check-build` stages them in target/gpu-check/), on a machine with
# an NVIDIA GPU, compute-sanitizer on the PATH and a python3 with PyTorch 2.11 (CUDA): the
# binaries find libtorch through that PyTorch. ROOT names the checkout (fixtures/, bench/gen.py;
# default: the folder above this one). Logs land in $OUT (default ./out); the last lines printed
# are the table of runs. Exit 0 when every test passed and every run ended with 0 errors.
#
# The sanitized runs (CASES below): `check` of a model whose vocabulary (383) is a multiple of
# neither vector width of the fused kernel (4 floats, 8 halves), on rows of length 1, 2 and 40,
# an all-masked row and a batch of one-token rows, in float32 (TF32 on and off) and bfloat16;
# with the probe beside the batches and without it; with a user loss; with --accum. Then the
# fused kernel's tests (every edge shape of tests/cuda_ce.rs) and tests/cuda_runtime.rs.
set -uo pipefail
cd "$(dirname "$0")"
HERE=$PWD
ROOT=${ROOT:-$HERE/..}
OUT=${OUT:-$HERE/out}
JOBS=${JOBS:-8}
TOOLS=${TOOLS:-memcheck initcheck racecheck synccheck}
W=/tmp/maskaudit-gpu-check
rm -rf "$W"
mkdir -p "$OUT" "$W/logs"
PY=${PYTHON:-python3}
torch_lib="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Every run compiles the fused kernel with NVRTC, as a first run does.
export MASKAUDIT_CACHE=off
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    compute-sanitizer --version | tail -1
    ./maskaudit --version
    date -u +%Y-%m-%dT%H:%MZ
} 2>&1 | tee "$OUT/machine.txt"

# The workload: a float32 GPT-shaped model of vocabulary 383 and rows that reach every edge.
"$PY" "$ROOT/bench/gen.py" model "$W/lm383.pt" --vocab 383 --width 64 --layers 2 --heads 2 \
    --max-pos 64 >/dev/null || exit 2
"$PY" - "$W/edges.jsonl" <<'EOF' || exit 2
import json, random, sys
rng = random.Random(7)
ids = lambda n: [rng.randrange(1, 383) for _ in range(n)]
rows = [{"input_ids": ids(1)} for _ in range(4)]                # a batch of one-token rows
rows += [{"input_ids": ids(1)}, {"input_ids": ids(40)},         # ragged, to 40
         {"input_ids": ids(12), "loss_mask": [0] * 12},         # all masked
         {"input_ids": ids(2)}]
for n in (3, 17, 40, 9, 25, 1, 33, 6):
    m = [int(rng.random() < 0.7) for _ in range(n)]
    m[-1] = 1
    rows.append({"input_ids": ids(n), "loss_mask": m})
with open(sys.argv[1], "w") as f:
    for r in rows:
        if "loss_mask" not in r:
            r["loss_mask"] = [1] * len(r["input_ids"])
        f.write(json.dumps(r) + "\n")
EOF

status=0
# The tests, plainly: every one must run (MASKAUDIT_REQUIRE_CUDA=1), none skip.
export MASKAUDIT_REQUIRE_CUDA=1 MASKAUDIT_BIN=$HERE/maskaudit MASKAUDIT_FIXTURES=$ROOT/fixtures
for t in cuda_ce cuda_runtime; do
    echo "== tests/$t.rs"
    ./"$t" --test-threads 1 2>&1 | tee "$OUT/test-$t.txt" | grep -E '^test |test result' ||
        status=1
    grep -q "test result: ok" "$OUT/test-$t.txt" || status=1
done

CHECK="./maskaudit check $W/lm383.pt $W/edges.jsonl --pad-id 0 --batch-size 4 --device cuda --quiet --format json"
LOSS="--loss $ROOT/fixtures/losses/correct_labels.pt"
# name | command (exit 0 or 1: a check may fail, nothing may break)
CASES=(
    "f32-tf32|$CHECK --dtype float32 --tf32 on"
    "f32|$CHECK --dtype float32 --tf32 off"
    "bf16|$CHECK --dtype bfloat16"
    "f32-no-probe|$CHECK --dtype float32 --tf32 off --no-model-probe"
    "bf16-loss|$CHECK --dtype bfloat16 $LOSS"
    "f32-loss|$CHECK --dtype float32 --tf32 off $LOSS"
    "f32-accum|$CHECK --dtype float32 --tf32 off --accum 2"
    "fixture-f16|./maskaudit check $ROOT/fixtures/tiny_lm_half.pt $ROOT/fixtures/ragged.jsonl --pad-id 0 --batch-size 4 --device cuda --quiet"
    "kernel-tests|./cuda_ce --test-threads 1 fused_losses_match_libtorch non_finite_logits"
    "runtime-tests|./cuda_runtime --test-threads 1"
)
sanitize() {
    local tool=$1 name=$2 cmd=$3
    local log="$W/logs/$tool-$name.log" start=$SECONDS
    # shellcheck disable=SC2086
    timeout "${RUN_TIMEOUT:-400}" compute-sanitizer --tool "$tool" --print-limit 50 --show-backtrace device $cmd >"$log" 2>&1
    local rc=$?
    local errors
    errors=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$log" | grep -o '[0-9]*' | tail -1)
    local kernels
    kernels=$(grep -E '^=========     at ' "$log" | sed -E 's/^=========     at //; s/\+0x[0-9a-f]+$//; s/^void //' |
        cut -c1-60 | sort | uniq -c | sort -rn | head -3 | awk '{c=$1; $1=""; printf "%s×%s;", c, $0}')
    local verdict=ok
    if [ "${errors:-x}" != 0 ] || [ "$rc" -gt 1 ]; then verdict=FAIL; fi
    printf '%-10s %-14s %-4s exit %-3s errors %-6s %4ss %s\n' "$tool" "$name" "$verdict" "$rc" \
        "${errors:-?}" "$((SECONDS - start))" "$kernels"
}
export -f sanitize
export W RUN_TIMEOUT
for tool in $TOOLS; do
    for c in "${CASES[@]}"; do
        printf '%s|%s\n' "$tool" "$c"
    done
done | xargs -d '\n' -P "$JOBS" -I{} bash -c 'IFS="|" read -r t n c <<<"$1"; sanitize "$t" "$n" "$c"' _ {} |
    sort | tee "$OUT/sanitizer.txt"
tar czf "$OUT/sanitizer-logs.tgz" -C "$W" logs
runs=$(wc -l <"$OUT/sanitizer.txt")
failed=$(grep -c ' FAIL ' "$OUT/sanitizer.txt")
echo "== $runs sanitizer runs, $failed failed"
[ "$runs" -eq $(( $(wc -w <<<"$TOOLS") * ${#CASES[@]} )) ] || status=1
[ "$failed" = 0 ] || status=1
echo "gpu-check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
