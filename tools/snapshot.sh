#!/usr/bin/env bash
# tools/snapshot.sh BIN OUTDIR: runs a broad matrix of maskaudit commands on the fixtures (and on
# target/hf-models when present) and records each one's stdout, stderr, exit status and written
# files under OUTDIR. For refactors: run it with the build before and after, then `diff -r`
# the two folders. About 3 minutes on two cores.
set -u
BIN=$(realpath "$(command -v "$1" || echo "$1")"); OUT=$(realpath -m "$2")
rm -rf "$OUT"; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
n=0
# Each command's files are named after a hash of it, so that runs with more or fewer commands
# (a new fixture) still line up under `diff -r`.
r() {
  n=$((n+1)); local id; id=$(printf '%s' "$*" | sha1sum | cut -c1-12)
  "$BIN" "$@" >"$OUT/$id.out" 2>"$OUT/$id.err"; echo "rc=$?" >"$OUT/$id.rc"
  printf '%s\n' "$*" >"$OUT/$id.cmd"
}
F=fixtures
for m in $F/*.pt $F/odd/*.pt; do
  for d in $F/ragged.jsonl $F/padded_labels.jsonl $F/padded_loss_mask.jsonl; do
    r check $m $d --pad-id 0 --batch-size 4 --format json
  done
  r check $m $F/ragged.jsonl --pad-id 0 --batch-size 3
done
for l in $F/losses/*.pt $F/odd/*loss*.pt; do
  for d in $F/ragged.jsonl $F/padded_labels.jsonl $F/padded_loss_mask.jsonl; do
    r check $F/tiny_lm.pt $d --pad-id 0 --batch-size 4 --format json --loss $l
  done
  r check $F/tiny_lm.pt $F/ragged.jsonl --pad-id 0 --batch-size 4 --loss $l --accum 2 --world-size 2 --format json
  r check $F/tiny_lm.pt $F/ragged.jsonl --pad-id 0 --batch-size 2 --loss $l --format markdown
  r check $F/tiny_lm.pt $F/ragged.jsonl --pad-id 0 --batch-size 2 --loss $l
done
# A fixed folder: the report files name each other, so their path must not change between runs.
W=${TMPDIR:-/tmp}/maskaudit-snapshot-files; rm -rf "$W"; mkdir -p "$W"
r check $F/tiny_lm.pt $F/ragged.jsonl --pad-id 0 --batch-size 4 --loss $F/losses/correct_labels.pt --weights-out $W/w.jsonl --junit $W/j.xml --html $W/h.html --write-baseline $W/b.json
r check $F/tiny_lm.pt $F/padded_labels.jsonl --pad-id 0 --batch-size 4 --baseline $W/b.json --format json
r lint $F/lint/padding_trained.jsonl --pad-id 0 --junit $W/lj.xml --html $W/lh.html
for f in "$W"/*; do cp "$f" "$OUT/file.$(basename "$f")"; done; rm -rf "$W"
for d in $F/lint/*.jsonl $F/*.jsonl; do
  r lint $d --format json
  r lint $d --pad-id 0 --eos-id 2 --format json
  r lint $d --pad-id 0 --eos-id 2
  r lint $d --pad-id 0 --show 2 --color never
  r lint $d --pad-id 0 --show 2 --color never --tokenizer $F/lint/tokenizer.json
done
for p in $F/hostile/*/*.parquet; do
  r check $F/tiny_lm.pt $p --pad-id 0 --format json
  r lint $p --pad-id 0 --format json
done
for code in $("$BIN" explain all 2>/dev/null | awk '{print $1}' | grep -E '^[a-z]+(-[a-z0-9]+)+$'); do r explain $code; done
r explain all
r --help; r check --help; r lint --help
if [ -d target/hf-models ]; then for m in target/hf-models/*.pt target/hf-models/*/*.pt; do r check $m $F/ragged.jsonl --pad-id 0 --batch-size 4 --format json; done; fi
echo "$n commands"
