#!/usr/bin/env bash
# maskaudit against the PyTorch peer and the forward-only floor (docs/performance.md).
# Builds what it times, generates the workloads under target/bench/ (once), then runs
# bench/bench.py with any arguments given here, e.g. `bench/run.sh --only compute --reps 9`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${XDG_CACHE_HOME:-$HOME/.cache}/maskaudit/venv-torch-2.11.0"
PYTHON="${PYTHON:-$venv/bin/python}"
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "bench: no PyTorch in $PYTHON; run 'make build' first (it sets the venv up), or set PYTHON" >&2
    exit 2
fi
cargo build --release --locked --bin maskaudit --example forward_only
exec "$PYTHON" bench/bench.py --python "$PYTHON" "$@"
