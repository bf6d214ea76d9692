#!/usr/bin/env python3
"""The wheel as a user installs it (`make test-wheel`; the Makefile installs, this checks).
Standard library only: it drives the installed commands from outside the checkout.

    check_wheel.py cli VENV            the pinned torch and the wheel alone
    check_wheel.py split VENV TARGET   the wheel in TARGET (pip --target), torch in VENV
    check_wheel.py train VENV          with the `train` extra: maskaudit-export, maskaudit.capture
    check_wheel.py wrong-torch VENV    the wheel without torch, then beside a stub torch 2.10.0
    check_wheel.py pipx BIN            BIN: the maskaudit command pipx exposes

Each part prints `wheel-<part>: N passed, 0 failed` or exits 1 naming what differs.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
CHECK = ["check", str(FIXTURES / "tiny_lm.pt"), str(FIXTURES / "ragged.jsonl"),
         "--pad-id", "0", "--batch-size", "4"]
HERE = Path(__file__).resolve().parent
NEEDS = 'maskaudit 0.1.0 needs torch 2.11.*; this environment has {}: pip install "torch==2.11.*"'
passed = []


def run(cmd, env=None, **kw):
    # From a scratch directory: nothing of the checkout is importable or found by a relative path.
    scratch = tempfile.mkdtemp(prefix="maskaudit-wheel-")
    try:
        return subprocess.run([str(c) for c in cmd], cwd=scratch, capture_output=True,
                              text=True, env=env, **kw)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def expect(what, ok, out=None):
    if not ok:
        detail = "" if out is None else f"\n  exit {out.returncode}\n  stdout: " \
            f"{out.stdout[-2000:]}\n  stderr: {out.stderr[-2000:]}"
        sys.exit(f"check_wheel: {what}: FAILED{detail}")
    passed.append(what)


def close(x, y, rel=1e-5):
    return abs(x - y) <= rel * max(abs(y), 1e-12)


def the_fixture_check(maskaudit, env=None):
    """check on the fixtures: exit 0 and expected.json's numbers (PyTorch's, 1e-5 relative)."""
    out = run([*maskaudit, *CHECK, "--format", "json"], env=env)
    expect("check exits 0", out.returncode == 0, out)
    got = json.loads(out.stdout)
    want = next(c for c in json.loads((FIXTURES / "expected.json").read_text())["cases"]
                if c["name"] == "ragged_tiny_lm_b4")
    for key in ("rows", "batches", "positions", "supervised_positions",
                "padding_target_positions", "mask_source"):
        expect(f"check data.{key}", got["data"][key] == want[key], out)
    for key, value in want["losses"].items():
        expect(f"check losses.{key}", close(got["losses"][key], value), out)
    expect("check contamination",
           close(got["contamination"]["relative"], want["contamination"]["relative"]), out)
    expect("check verdict", got["verdict"] == "pass", out)


def cli(venv):
    bin_ = Path(venv) / "bin"
    maskaudit = [bin_ / "maskaudit"]
    out = run([*maskaudit, "--version"])
    expect("--version", (out.returncode, out.stdout) == (0, "maskaudit 0.1.0\n"), out)
    the_fixture_check(maskaudit)
    # The table, and the binary's exit statuses and standard error through the launcher.
    out = run([*maskaudit, *CHECK])
    expect("check's table", out.stdout.rstrip().endswith("verdict: pass"), out)
    out = run([*maskaudit, "lint", FIXTURES / "lint/eos_masked.jsonl", "--pad-id", "2",
               "--eos-id", "2"])
    expect("a failing lint exits 1", out.returncode == 1 and "error[eos-masked]" in out.stdout,
           out)
    out = run([*maskaudit, "check", "absent.pt", FIXTURES / "ragged.jsonl"])
    expect("bad input exits 2 with one line",
           out.returncode == 2 and out.stderr == "maskaudit: error: absent.pt: no such file\n",
           out)
    out = run([*maskaudit, "lint", "-", "--pad-id", "0"],
              input=(FIXTURES / "ragged.jsonl").read_text())
    expect("standard input reaches the binary", out.returncode == 0 and "30 rows" in out.stdout,
           out)
    # CUDA stays lazy: a CPU run never loads libtorch_cuda.so; --device cuda opens it from
    # the installed torch through the runpath (and then finds no GPU here, or uses it).
    env = dict(os.environ, LD_DEBUG="libs")
    out = run([*maskaudit, *CHECK, "--device", "cpu"], env=env)
    expect("a CPU run loads no libtorch_cuda.so",
           out.returncode == 0 and "libtorch_cuda.so" not in out.stderr, out)
    out = run([*maskaudit, *CHECK, "--device", "cuda"], env=env)
    site = next(Path(venv).resolve().glob("lib/python*/site-packages"))
    opened = f"calling init: {site}/maskaudit/_bin/../../torch/lib/libtorch_cuda.so"
    expect("--device cuda opens the installed torch's libtorch_cuda.so",
           any(line.strip().endswith(opened) for line in out.stderr.splitlines()), out)
    # The Python API, without the checkout.
    out = run([bin_ / "python", "-c",
               "import maskaudit, maskaudit.loss, maskaudit.capture; print(maskaudit.__version__)"])
    expect("import maskaudit", out.returncode == 0 and out.stdout == "0.1.0\n", out)


def split(venv, target):
    """The wheel installed apart from torch (a --system-site-packages venv, PYTHONPATH): the
    runpath misses torch, so the launcher names torch's lib/ in LD_LIBRARY_PATH."""
    env = dict(os.environ, PYTHONPATH=str(target))
    launcher = [Path(venv) / "bin/python", "-c",
                "import sys; from maskaudit._launcher import main; sys.exit(main())"]
    out = run([*launcher, "--version"], env=env)
    expect("--version apart from torch", out.returncode == 0, out)
    the_fixture_check(launcher, env)


def train(venv):
    bin_ = Path(venv) / "bin"
    work = Path(tempfile.mkdtemp(prefix="maskaudit-wheel-train-"))
    try:
        out = run([bin_ / "python", HERE / "tiny_run.py", "model", work])
        expect("a tiny Llama with save_pretrained", out.returncode == 0, out)
        out = run([bin_ / "maskaudit-export", work / "hf", work / "model.pt"])
        expect("maskaudit-export", out.returncode == 0 and (work / "model.pt").is_file(), out)
        out = run([bin_ / "maskaudit", "check", work / "model.pt", work / "data.jsonl",
                   "--pad-id", "0", "--format", "json"])
        expect("check on the exported model", out.returncode == 0, out)
        got = json.loads(out.stdout)
        expect("the export's record names the architecture",
               got["model"]["architecture"] == "LlamaForCausalLM", out)
        out = run([bin_ / "python", HERE / "tiny_run.py", "train", work])
        expect("a two-step Trainer run with maskaudit.capture",
                out.returncode == 0 and (work / "run.parquet").is_file(), out)
        out = run([bin_ / "maskaudit", "check", work / "model.pt", work / "run.parquet",
                   "--pad-id", "0", "--format", "json"])
        expect("check on the capture", out.returncode == 0, out)
        capture = json.loads(out.stdout)["data"]["capture"]
        losses = json.loads(out.stdout)["losses"]
        expect("the capture's micro-batches", (capture["source"], capture["micro_batches"],
                                               capture["counts_compared"]) == ("trainer", 2, 1),
               out)
        expect("the trainer's loss is the token mean",
               close(capture["trainer_token_mean"], losses["masked_token_mean"], 1e-4), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wrong_torch(venv):
    maskaudit = Path(venv) / "bin/maskaudit"
    out = run([maskaudit, *CHECK])
    expect("no torch: one line, exit 2",
           (out.returncode, out.stdout, out.stderr) == (2, "", NEEDS.format("no torch") + "\n"),
           out)
    site = next(Path(venv).glob("lib/python*/site-packages"))
    # Package metadata is all the launcher reads: a stub stands in for a second torch download.
    stub = site / "torch-2.10.0.dist-info"
    stub.mkdir()
    (stub / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n")
    (stub / "RECORD").write_text("")
    out = run([maskaudit, *CHECK])
    expect("torch 2.10.0: one line, exit 2",
           (out.returncode, out.stdout, out.stderr)
           == (2, "", NEEDS.format("torch 2.10.0") + "\n"), out)


def pipx(command):
    out = run([command, "--version"])
    expect("pipx: --version", (out.returncode, out.stdout) == (0, "maskaudit 0.1.0\n"), out)
    the_fixture_check([command])


if __name__ == "__main__":
    part, *args = sys.argv[1:]
    {"cli": cli, "split": split, "train": train, "wrong-torch": wrong_torch,
     "pipx": pipx}[part](*args)
    print(f"wheel-{part}: {len(passed)} passed, 0 failed")
