#!/usr/bin/env bash
# The GPU measurement (docs/performance.md). LIBTORCH.md: build here, run there. Copy the
# release builds `maskaudit` and `forward_only` (target/release/examples/) into bench/ of a
# checkout and run it there, on a machine whose python3 has PyTorch 2.11 with CUDA and
# transformers. It generates the workloads with that PyTorch under /tmp/bench (a
# GPT-2-small-shaped model with 2000 rows of 1024 tokens; transformers' Qwen2 in Qwen2-0.5B's
# shape, bf16, through tools/maskaudit-export.py, with 256 rows of 2048), then, in one go:
#   0. the exporter's models on the GPU against eager (bench/hf_gpu.py);
#   1. the fixture on the GPU in float32 without and with TF32, in bfloat16 and float16 (the
#      numeric effect of --tf32 and --dtype against fixtures/expected.json);
#   2. gpt2-small in bfloat16 and in float32 with TF32, and qwen2-0.5b in its bf16: maskaudit,
#      the peer and the forward-only floor each time, bench.py's targets (VARIANTS=1 adds
#      maskaudit without the overlap, without the probe, with libtorch's cross-entropy);
#   3. a batch of 48 x 2048 tokens of the 152k-vocabulary model, maskaudit against the peer,
#      with the GPU's memory in use sampled every 50 ms;
#   4. gpt2-small in float32 without TF32 (the slowest, last).
# Arguments go to every bench.py run (e.g. --reps 3). Results land in $OUT; FIXTURES names the
# fixtures folder (default ../fixtures).
set -uo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-$PWD/out}"
FIXTURES="${FIXTURES:-../fixtures}"
# bench.py's qwen2-0.5b model, which sections 2 and 3 also run by hand.
QWEN=/tmp/bench/qwen2_0.5b_hf_bf16.pt
mkdir -p "$OUT"
status=0
torch_lib="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    echo "CPUs: $(nproc)"
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(), "threads", torch.get_num_threads())'
    ./maskaudit --version
} 2>&1 | tee "$OUT/machine.txt"

# 0. The exporter's models on the GPU: tiny configs of five architectures exported with
#    --device cuda, against their eager models; the odd fixtures against their CPU verdicts.
#    Needs transformers in python3 and the repository around this folder.
#    HF=0 skips it.
if [ "${HF:-1}" = 1 ] && [ -f ../tests/export/build_models.py ]; then
    {
        echo "== exported Hugging Face models on cuda against eager (bench/hf_gpu.py)"
        python3 ../tests/export/build_models.py --device cuda --out /tmp/hf-cuda \
            >"$OUT/hf-build.txt" 2>&1
        built=$?
        tail -2 "$OUT/hf-build.txt"
        python3 hf_gpu.py /tmp/hf-cuda ./maskaudit "$FIXTURES" && [ "$built" = 0 ]
    } 2>&1 | tee "$OUT/hf.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

# 1. The fixture: dtype and TF32 on the GPU.
{
    echo "== fixture tiny_lm.pt on ragged.jsonl, batch 4, on cuda (expected.json: PyTorch f32 on the CPU)"
    python3 - "$FIXTURES/expected.json" <<'EOF'
import json, sys
case = json.load(open(sys.argv[1]))["cases"][0]
print(f"expected masked_token_mean {case['losses']['masked_token_mean']:.10f}")
EOF
    cat >/tmp/fixture_line.py <<'EOF'
import json, sys
text = sys.stdin.read()
try:
    r = json.loads(text[text.index("{"):])
except ValueError:
    print(sys.argv[1], "failed:", text[-400:])
    sys.exit()
m = r["model"]
print(f"{sys.argv[1]:28s} run_dtype {m['run_dtype']:9s} tf32 {m['tf32']!s:5s} "
      f"masked_token_mean {r['losses']['masked_token_mean']:.10f} verdict {r['verdict']} "
      f"cross_entropy {m.get('cross_entropy')} "
      f"probe tolerance {m['consistency']['tolerance']}")
EOF
    for opts in "--dtype float32 --tf32 off" "--dtype float32 --tf32 on" "--dtype bfloat16" \
        "--dtype float16"; do
        # shellcheck disable=SC2086
        ./maskaudit check "$FIXTURES/tiny_lm.pt" "$FIXTURES/ragged.jsonl" --pad-id 0 \
            --batch-size 4 --device cuda --format json --quiet $opts 2>&1 |
            python3 /tmp/fixture_line.py "$opts"
    done
} 2>&1 | tee "$OUT/extra.txt"

# 2. Throughput.
cat >maskaudit-no-overlap <<EOF
#!/bin/sh
MASKAUDIT_OVERLAP=0 exec "$PWD/maskaudit" "\$@"
EOF
chmod +x maskaudit-no-overlap
# libtorch's cross-entropy instead of the fused kernel (loss::cuda_ce), for comparison.
cat >maskaudit-libtorch-ce <<EOF
#!/bin/sh
MASKAUDIT_FUSED_CE=0 exec "$PWD/maskaudit" "\$@"
EOF
chmod +x maskaudit-libtorch-ce
bench() {
    local tag=$1
    shift
    echo "== $tag: bench.py $*" | tee -a "$OUT/summary.txt"
    python3 bench.py --device cuda --python python3 --maskaudit ./maskaudit --floor ./forward_only \
        --dir /tmp/bench --json "$OUT/$tag.json" "$@" \
        2> >(tee -a "$OUT/log.txt" >&2) | tee -a "$OUT/summary.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || status=$rc
    echo | tee -a "$OUT/summary.txt"
}
# VARIANTS=1 times maskaudit with a part turned off beside it (about 3 minutes more).
gpt2_variants=()
qwen2_variants=()
if [ "${VARIANTS:-0}" = 1 ]; then
    gpt2_variants=(--variant no-overlap=./maskaudit-no-overlap
        --variant libtorch-ce=./maskaudit-libtorch-ce)
    qwen2_variants=(--variant no-probe=./maskaudit-no-probe "${gpt2_variants[@]}")
fi
bench gpt2_bf16 --only gpt2-small --dtype bfloat16 ${gpt2_variants[@]+"${gpt2_variants[@]}"} "$@"
bench gpt2_tf32 --only gpt2-small --dtype float32 --tf32 on "$@"
cat >maskaudit-no-probe <<EOF
#!/bin/sh
exec "$PWD/maskaudit" "\$@" --no-model-probe
EOF
chmod +x maskaudit-no-probe
bench qwen2_bf16 --only qwen2-0.5b --dtype auto ${qwen2_variants[@]+"${qwen2_variants[@]}"} "$@"
{
    echo "== qwen2-0.5b phases (MASKAUDIT_TIMING=1), then the floor"
    MASKAUDIT_TIMING=1 ./maskaudit check "$QWEN" /tmp/bench/qwen2_2048.jsonl \
        --pad-id 0 --batch-size 8 --device cuda --format json --quiet 2>&1 >/dev/null | grep timing
    ./forward_only "$QWEN" /tmp/bench/qwen2_2048.jsonl 8 0 cuda
} 2>&1 | tee -a "$OUT/extra.txt"

# 3. Memory: 48 rows of 2048 tokens in one batch, 152k vocabulary (logits alone: 30 GB in bf16).
{
    echo "== memory: qwen2_0.5b_hf_bf16, 96 rows of 2048 tokens, batch 48"
    python3 gen.py data /tmp/bench/qwen2_mem.jsonl --rows 96 --min-len 2048 --max-len 2048 \
        --vocab 151936 >/dev/null
    for who in maskaudit peer; do
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"/tmp/mem_$who.txt" &
        smi=$!
        start=$(date +%s.%N)
        if [ $who = maskaudit ]; then
            ./maskaudit check "$QWEN" /tmp/bench/qwen2_mem.jsonl --pad-id 0 \
                --batch-size 48 --device cuda --format json --quiet >/tmp/mem_out.txt 2>&1
        else
            python3 peer.py "$QWEN" /tmp/bench/qwen2_mem.jsonl --pad-id 0 \
                --batch-size 48 --device cuda >/tmp/mem_out.txt 2>&1
        fi
        rc=$?
        end=$(date +%s.%N)
        kill "$smi"
        wait "$smi" 2>/dev/null
        peak=$(sort -n "/tmp/mem_$who.txt" | tail -1)
        echo "$who: exit $rc, $(python3 -c "print(f'{$end - $start:.1f}')") s, peak GPU memory in use ${peak} MiB"
        grep -o '"masked_token_mean": [0-9.]*' /tmp/mem_out.txt | head -1
        grep -m1 -o 'OutOfMemoryError.\{0,160\}' /tmp/mem_out.txt
        tail -c 300 /tmp/mem_out.txt | grep -i "error" | tail -2
    done
} 2>&1 | tee -a "$OUT/extra.txt"

# Last, the slowest: float32 without TF32 (PyTorch's default).
bench gpt2_f32 --only gpt2-small --dtype float32 --tf32 off "$@"
exit "$status"
