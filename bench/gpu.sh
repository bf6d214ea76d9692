#!/usr/bin/env bash
# The GPU measurement (README.md, "Performance"). LIBTORCH.md: build here, run there. Copy next
# to this script: bench.py, gen.py, peer.py, and the release builds `maskaudit` and
# `forward_only` (target/release/examples/); run it on a machine whose python3 has PyTorch 2.11
# with CUDA. It generates a GPT-2-small-shaped model and 2000 rows of 1024 tokens with that
# PyTorch under /tmp/bench, then times maskaudit, the peer and the forward-only floor on the GPU.
# Arguments go to bench.py (e.g. --reps 3, --variant NAME=BINARY). Results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
torch_lib="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    echo "CPUs: $(nproc)"
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(), "threads", torch.get_num_threads())'
    ./maskaudit --version
} 2>&1 | tee "$OUT/machine.txt"
python3 bench.py --only gpt2-small --device cuda --python python3 --maskaudit ./maskaudit \
    --floor ./forward_only --dir /tmp/bench --json "$OUT/gpu.json" "$@" \
    2> >(tee "$OUT/log.txt" >&2) | tee "$OUT/summary.txt"
