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
PEER="$PY $ROOT/bench/peer.py $W/lm383.pt $W/edges.jsonl --pad-id 0 --batch-size 4 --device cuda"
ALL="memcheck initcheck racecheck synccheck"
# tools | name | sanitizer options | command (exit 0 or 1: a check may fail, nothing may break).
# Runs left out of a tool meet a libtorch kernel that PyTorch alone shows under that tool (the
# LIBTORCH runs below; docs/performance.md, "compute-sanitizer"): initcheck with TF32 on or in
# bf16/f16, racecheck in bf16 (cuDNN's attention) and of libtorch's cross-entropy (aminmax).
CASES=(
    "$ALL|f32|-|$CHECK --dtype float32 --tf32 off"
    "$ALL|f32-no-probe|-|$CHECK --dtype float32 --tf32 off --no-model-probe"
    "$ALL|f32-loss|-|$CHECK --dtype float32 --tf32 off $LOSS"
    "$ALL|f32-accum|-|$CHECK --dtype float32 --tf32 off --accum 2"
    "memcheck racecheck synccheck|f32-tf32|-|$CHECK --dtype float32 --tf32 on"
    "memcheck synccheck|bf16|-|$CHECK --dtype bfloat16"
    "memcheck synccheck|bf16-loss|-|$CHECK --dtype bfloat16 $LOSS"
    "memcheck racecheck synccheck|f16-logits|-|./maskaudit check $ROOT/fixtures/tiny_lm_half.pt $ROOT/fixtures/ragged.jsonl --pad-id 0 --batch-size 4 --device cuda --quiet"
    "memcheck initcheck synccheck|kernel-tests|-|./cuda_ce --test-threads 1 fused_losses_match_libtorch non_finite_logits"
    "$ALL|runtime-tests|--report-api-errors no|./cuda_runtime --test-threads 1"
)
# Informational: libtorch's own reports, from PyTorch alone and from maskaudit, never a failure.
LIBTORCH=(
    "initcheck|peer-tf32|-|$PEER --tf32 on"
    "initcheck|peer-bf16|-|$PEER --dtype bfloat16"
    "initcheck|linear-bf16|-|$PY initcheck_linear.py --dtype bfloat16"
    "initcheck|f32-tf32|-|$CHECK --dtype float32 --tf32 on"
    "initcheck|bf16|-|$CHECK --dtype bfloat16"
    "racecheck|peer-bf16|-|$PEER --dtype bfloat16"
    "racecheck|bf16|-|$CHECK --dtype bfloat16"
)
sanitize() {
    local kind=$1 tool=$2 name=$3 opts=$4 cmd=$5
    [ "$opts" = - ] && opts=
    local log="$W/logs/$kind-$tool-$name.log" start=$SECONDS
    # shellcheck disable=SC2086
    timeout "${RUN_TIMEOUT:-400}" compute-sanitizer --tool "$tool" $opts --print-limit 50 \
        --show-backtrace device $cmd >"$log" 2>&1
    local rc=$?
    # memcheck, initcheck, synccheck: "ERROR SUMMARY: N errors"; racecheck: "(N errors, ...".
    local errors
    errors=$({ grep -o 'ERROR SUMMARY: [0-9]* error' "$log"; grep -o 'SUMMARY: .*(\([0-9]*\) error' "$log" | grep -o '([0-9]*' ; } |
        grep -o '[0-9]*' | tail -1)
    local kernels
    kernels=$(grep -E '^=========     at |^========= Error: Race reported between' "$log" |
        sed -E 's/^=========     at //; s/^========= Error: Race reported between [A-Za-z]+ access at //; s/\+0x[0-9a-f]+.*$//; s/^void //' |
        cut -c1-60 | sort | uniq -c | sort -rn | head -3 | awk '{c=$1; $1=""; printf "%s×%s;", c, $0}')
    local verdict=ok
    if [ "${errors:-x}" != 0 ] || [ "$rc" -gt 1 ]; then verdict=FAIL; fi
    [ "$kind" = libtorch ] && verdict=info
    printf '%-8s %-10s %-14s %-4s exit %-3s errors %-6s %4ss %s\n' "$kind" "$tool" "$name" \
        "$verdict" "$rc" "${errors:-?}" "$((SECONDS - start))" "$kernels"
}
export -f sanitize
export W RUN_TIMEOUT
for c in "${CASES[@]}"; do
    IFS='|' read -r tools rest <<<"$c"
    for tool in $tools; do
        [[ " $TOOLS " == *" $tool "* ]] && printf 'own|%s|%s\n' "$tool" "$rest"
    done
done >"$W/runs.txt"
if [ "${LIBTORCH_RUNS:-1}" = 1 ]; then
    printf 'libtorch|%s\n' "${LIBTORCH[@]}" >>"$W/runs.txt"
fi
xargs -d '\n' -P "$JOBS" -I{} bash -c 'IFS="|" read -r k t n o c <<<"$1"; sanitize "$k" "$t" "$n" "$o" "$c"' _ {} \
    <"$W/runs.txt" | sort | tee "$OUT/sanitizer.txt"
tar czf "$OUT/sanitizer-logs.tgz" -C "$W" logs
runs=$(grep -c '^own ' "$OUT/sanitizer.txt")
failed=$(grep -c ' FAIL ' "$OUT/sanitizer.txt")
echo "== $runs sanitizer runs of maskaudit's paths, $failed failed (libtorch's own: the info rows)"
[ "$runs" -eq "$(grep -c '^own|' "$W/runs.txt")" ] || status=1
[ "$failed" = 0 ] || status=1
echo "gpu-check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
