#!/usr/bin/env python3
"""maskaudit against the PyTorch peer (bench/peer.py) and the forward-only floor
(bench/forward_only.rs), side by side, on generated workloads. docs/performance.md says
what is measured and how; bench/run.sh (`make bench`) builds and runs this.

Every run is a fresh process, timed wall-clock from spawn to exit, with its peak RSS from
wait4's rusage. The contenders take turns (maskaudit, peer, floor, maskaudit, ...) so that a
change in the machine's load hits all of them alike; the summary gives medians. Before any
timing, the aggregates of maskaudit's JSON and of the peer are compared: a relative difference
above 1e-4 fails the harness.

    bench.py [--reps N] [--only ci,compute,scale,large-vocab] [--device cpu|cuda]
             [--dtype auto|float32|bfloat16|float16] [--tf32 on|off]

--dtype and --tf32 go to all three contenders alike: maskaudit's options of the same names, the
peer's `model.to(dtype)` and `torch.backends.cuda.matmul.allow_tf32`, the floor's arguments.
The default (`--tf32 off`) is PyTorch's and the peer's default; maskaudit's own is on.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
AGGREGATES = (
    "masked_token_mean",
    "all_positions_mean",
    "masked_sum_over_all_positions",
    "sequence_mean",
    "batch_mean_of_means",
)
GiB = 1 << 30

# The compute-bound model; `scale` runs the very same one over ten times the rows.
GPT_4X256 = {"name": "gpt_4x256_v32000", "vocab": 32000, "width": 256, "layers": 4, "heads": 4,
             "max_pos": 128}

# name: model (generated unless a path), data (generated unless a path), batch size, default reps
WORKLOADS = {
    "ci": {
        "what": "CI-sized: tiny fixture LM (vocab 48), 30 ragged rows",
        "model": {"path": "fixtures/tiny_lm.pt"},
        "data": {"path": "fixtures/ragged.jsonl"},
        "batch_size": 4,
        "reps": 7,
    },
    "compute": {
        "what": "compute-bound: GPT 4x256, vocab 32000, 100 rows of 16-128 tokens",
        "model": GPT_4X256,
        "data": {"name": "compute", "rows": 100, "min_len": 16, "max_len": 128, "vocab": 32000},
        "batch_size": 8,
        "reps": 5,
    },
    "scale": {
        "what": "scale: the compute-bound model over 10x the rows (1000)",
        "model": GPT_4X256,
        "data": {"name": "scale", "rows": 1000, "min_len": 16, "max_len": 128, "vocab": 32000},
        "batch_size": 8,
        "reps": 2,
        "warmup": 0,  # the compute workload has warmed the model's file and the libraries
    },
    "large-vocab": {
        "what": "large vocabulary: GPT 2x64, vocab 152064, 8 rows of 2048 tokens, batch 2",
        "model": {"name": "gpt_2x64_v152064", "vocab": 152064, "width": 64, "layers": 2,
                  "heads": 4, "max_pos": 2048},
        "data": {"name": "large_vocab", "rows": 8, "min_len": 2048, "max_len": 2048,
                 "vocab": 152064},
        "batch_size": 2,
        "reps": 3,
    },
    # A realistic size for the GPU (bench/gpu.sh): transformers' Qwen2ForCausalLM in Qwen2-0.5B's
    # shape, random weights in bfloat16, exported by tools/maskaudit-export.py as a user would
    # (eager attention, forward(input_ids, attention_mask)); 256 rows of 2048 tokens.
    "qwen2-0.5b": {
        "what": "Qwen2-0.5B shape through the exporter: 24x896, GQA 14/2, SwiGLU 4864, vocab "
                "151936, 494M parameters, bf16; 256 rows of 2048 tokens",
        "model": {"name": "qwen2_0.5b_hf_bf16", "arch": "qwen2-hf", "vocab": 151936, "width": 896,
                  "layers": 24, "heads": 14, "kv_heads": 2, "ffn": 4864, "max_pos": 32768,
                  "dtype": "bfloat16"},
        "data": {"name": "qwen2_2048", "rows": 256, "min_len": 2048, "max_len": 2048,
                 "vocab": 151936},
        "batch_size": 8,
        "reps": 2,
    },
    # The GPU workload (bench/gpu.sh): GPT-2 small, 124M parameters.
    "gpt2-small": {
        "what": "GPT-2 small: 12x768, vocab 50257, 124M parameters; 2000 rows of 1024 tokens",
        "model": {"name": "gpt2_small", "vocab": 50257, "width": 768, "layers": 12,
                  "heads": 12, "max_pos": 1024},
        "data": {"name": "gpt2_small", "rows": 2000, "min_len": 1024, "max_len": 1024,
                 "vocab": 50257},
        "batch_size": 8,
        "reps": 3,
    },
}
CPU_DEFAULT = ("ci", "compute", "scale", "large-vocab")
GPU_WORKLOADS = ("gpt2-small", "qwen2-0.5b")

# Targets (issue 5), checked on the CPU workloads.
CI_RATIO = 0.3
COMPUTE_RATIO = 0.95
FLOOR_OVERHEAD = 0.10
RSS_FLAT = 0.10
LARGE_VOCAB_RSS = 24 * GiB
# Targets on the GPU (issue 13): in bf16, tokens/s >= 1.1x the bf16 peer (its start included) and
# at most 5% over the bf16 floor; in float32, at most 3% over its floor.
GPU_BF16_PEER = 1.1
GPU_BF16_FLOOR = 0.05
GPU_F32_FLOOR = 0.03
# The H200's dense bf16 matrix rate as measured on this workplace's machines (KINDS.md: an
# 8192^3 product through PyTorch, 769-798 TFLOP/s; the datasheet says 989).
H200_BF16_FLOPS = 790e12


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load_average():
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return ["?"] * 3


def generate(python, bench_dir, spec):
    """Makes the workload's model and data (once; kept under bench_dir)."""
    paths = {}
    for kind in ("model", "data"):
        s = spec[kind]
        if "path" in s:
            paths[kind] = ROOT / s["path"]
            continue
        suffix = ".pt" if kind == "model" else ".jsonl"
        out = bench_dir / (s["name"] + suffix)
        if kind == "model":
            args = ["model", str(out), "--vocab", s["vocab"], "--width", s["width"],
                    "--layers", s["layers"], "--heads", s["heads"], "--max-pos", s["max_pos"]]
            for key in ("arch", "kv_heads", "ffn", "dtype"):
                if key in s:
                    args += ["--" + key.replace("_", "-"), s[key]]
        else:
            args = ["data", str(out), "--rows", s["rows"], "--min-len", s["min_len"],
                    "--max-len", s["max_len"], "--vocab", s["vocab"]]
        stamp = out.with_name(out.name + ".args")
        want = " ".join(map(str, args))
        if not out.exists() or not stamp.exists() or stamp.read_text() != want:
            subprocess.run([python, str(HERE / "gen.py"), *map(str, args)], check=True,
                           stdout=sys.stderr)
            stamp.write_text(want)
        paths[kind] = out
    return paths["model"], paths["data"]


def run_once(cmd, env):
    """Runs cmd; returns (wall seconds, CPU seconds (user + system), peak RSS bytes, stdout).
    Fails loudly on error."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                             env=env)
        out = p.stdout.read()
        _, status, rusage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        # maskaudit exits 1 when a finding is an error: still a finished run.
        if p.returncode not in (0, 1):
            err.seek(0)
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
    return wall, rusage.ru_utime + rusage.ru_stime, rusage.ru_maxrss * 1024, out.decode()


def contenders(args, model, data, batch_size):
    device = args.device
    common = [str(model), str(data)]

    def maskaudit(binary):
        return [str(Path(binary).resolve()), "check", *common, "--pad-id", "0",
                "--batch-size", str(batch_size), "--device", device, "--format", "json",
                "--quiet", "--dtype", args.dtype, "--tf32", args.tf32]

    cmds = {
        "maskaudit": maskaudit(args.maskaudit),
        "peer": [args.python, str(HERE / "peer.py"), *common, "--pad-id", "0",
                 "--batch-size", str(batch_size), "--device", device, "--dtype", args.dtype,
                 "--tf32", args.tf32],
        "floor": [str(args.floor.resolve()), *common, str(batch_size), "0", device, args.dtype,
                  args.tf32],
    }
    # Other builds of maskaudit, timed alongside (e.g. before and after a change).
    for variant in args.variant:
        name, binary = variant.split("=", 1)
        cmds[name] = maskaudit(binary)
    return cmds


def compare(name, ours, peer, rtol=1e-4):
    """The peer must compute the same numbers: fails loudly otherwise."""
    ma = json.loads(ours)
    pe = json.loads(peer.strip().splitlines()[-1])
    log(f"  {name}: masked_token_mean maskaudit {ma['losses']['masked_token_mean']:.9f}  "
        f"peer {pe['losses']['masked_token_mean']:.9f}")
    for key in AGGREGATES:
        a, b = ma["losses"][key], pe["losses"][key]
        if abs(a - b) > rtol * abs(b):
            sys.exit(f"{name}: {key} differs: maskaudit {a} vs peer {b} (> {rtol} relative)")
    for key in ("rows", "positions", "supervised_positions"):
        if ma["data"][key] != pe[key]:
            sys.exit(f"{name}: {key} differs: maskaudit {ma['data'][key]} vs peer {pe[key]}")
    return ma


def report_for_peer_format(report):
    """maskaudit's JSON in the peer's shape, to compare two maskaudit builds with `compare`."""
    doc = json.loads(report)
    return json.dumps({"losses": doc["losses"], **{k: doc["data"][k] for k in
                       ("rows", "positions", "supervised_positions")}})


def bench(args, name, spec, bench_dir):
    model, data = generate(args.python, bench_dir, spec)
    cmds = contenders(args, model, data, spec["batch_size"])
    reps = args.reps or spec["reps"]
    log(f"{name}: {spec['what']}; {reps} rounds")
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    runs = {k: [] for k in cmds}
    peer_run = []
    warmup = spec.get("warmup", args.warmup) if args.warmup else 0
    names = list(cmds)
    for i in range(reps + warmup):
        # Round i starts with contender i: what ran just before a run (and left the page cache
        # and the free memory in some state) changes from round to round, for each of them.
        # The first round keeps maskaudit first: its report is the reference for the others.
        for who in names[i % len(names):] + names[:i % len(names)]:
            cmd = cmds[who]
            wall, cpu, rss, out = run_once(cmd, env)
            if who == "peer" and i >= warmup:
                peer_run.append(json.loads(out.strip().splitlines()[-1])["run_s"])
            if who == "floor":
                prepared = json.loads(out.strip().splitlines()[-1])
                wall -= prepared["prepare_s"]
                # Reading is single-threaded: its CPU time is its wall time.
                cpu -= prepared["prepare_s"]
            if i == 0 and who in ("peer", "floor"):
                # Like with like: libtorch's intra-op threads in the peer and in maskaudit's
                # process setup (which the floor shares).
                threads = json.loads(out.strip().splitlines()[-1])["threads"]
                log(f"  {who}: {threads} intra-op threads")
            if i == 0:
                if who == "maskaudit":
                    report = out
                    used = json.loads(out)["model"]["device"]
                    if not used.startswith(args.device.split(":")[0]):
                        sys.exit(f"{name}: maskaudit ran on {used}, not {args.device}")
                elif who == "peer":
                    # Both sides run the same forward in the same dtype, but the JIT's fusions
                    # (profiling executor on in the peer, off in maskaudit) round differently:
                    # 1e-4 in float32, 1e-3 where products round to bf16/f16/TF32.
                    reduced = args.dtype in ("bfloat16", "float16") or args.tf32 == "on" or (
                        args.dtype == "auto" and spec["model"].get("dtype", "float32")
                        != "float32")
                    report_json = compare(name, report, out, 1e-3 if reduced else 1e-4)
                elif who != "floor":
                    compare(f"{name} ({who})", out, report_for_peer_format(report))
            if i >= warmup:
                runs[who].append((wall, rss, cpu))
            log(f"  round {i + 1} {who:9s} {wall:8.3f} s  {rss / 2**20:8.1f} MiB"
                + ("  (warm-up)" if i < warmup else ""))
    med = {w: statistics.median(x[0] for x in r) for w, r in runs.items()}
    rss = {w: max(x[1] for x in r) for w, r in runs.items()}
    cpu = {w: statistics.median(x[2] for x in r) for w, r in runs.items()}
    # maskaudit against the floor of the same round (minutes apart at most, under the same
    # load), then the median of those ratios: other people's jobs on a shared machine move
    # both runs of a round alike, and the median of medians would mix rounds.
    paired = statistics.median(m[0] / f[0] for m, f in zip(runs["maskaudit"], runs["floor"]))
    tokens = sum(len(json.loads(line)["input_ids"]) for line in open(data) if line.strip())
    sidecar = Path(str(model) + ".json")
    params = json.loads(sidecar.read_text())["params"] if sidecar.exists() else None
    ran = json.loads(report)["model"]
    return {
        "workload": name,
        "dtype": args.dtype,
        "tf32": args.tf32,
        "run_dtype": ran.get("run_dtype"),
        "ran_tf32": ran.get("tf32"),
        "params": params,
        "what": spec["what"],
        "batch_size": spec["batch_size"],
        "rows": report_json["data"]["rows"],
        "tokens": tokens,
        "masked_token_mean": report_json["losses"]["masked_token_mean"],
        "median_s": med,
        # The peer's own time after `import torch`: what it would take without interpreter start.
        "peer_run_median_s": statistics.median(peer_run),
        "all_s": {w: [x[0] for x in r] for w, r in runs.items()},
        "all_cpu_s": {w: [x[2] for x in r] for w, r in runs.items()},
        "cpu_median_s": cpu,
        "peak_rss_bytes": rss,
        "ratio": med["maskaudit"] / med["peer"],
        "floor_overhead": paired - 1,
        # The same with CPU time (user + system): what maskaudit adds in work, whatever the
        # scheduling; informative, not a target.
        "floor_cpu_overhead": statistics.median(
            m[2] / f[2] for m, f in zip(runs["maskaudit"], runs["floor"])) - 1,
        "tokens_per_s": {w: tokens / med[w] for w in med},
        # Model FLOPs utilisation against the measured bf16 rate: 2 * params * tokens (the
        # forward's matrix products; attention's T^2 term left out).
        "mfu": {w: 2 * params * tokens / med[w] / H200_BF16_FLOPS for w in med}
        if params else None,
    }


def mark(ok):
    return "met" if ok else "NOT MET"


def summary(results, device, env, load_before, load_after):
    lines = []
    lines.append(f"device {device}; load average before {' '.join(load_before)}, "
                 f"after {' '.join(load_after)}; medians of interleaved runs; "
                 "overhead: median of each round's maskaudit / floor"
                 + (f"; env {' '.join(env)}" if env else ""))
    head = (f"{'workload':12s} {'maskaudit s':>11s} {'peer s':>8s} {'ratio':>6s} {'peer run':>8s} "
            f"{'floor s':>8s} "
            f"{'overhead':>8s} {'cpu ovh':>8s} {'RSS ours':>9s} {'RSS peer':>9s} {'tok/s ours':>11s} "
            f"{'tok/s peer':>11s}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in results.values():
        m, rss = r["median_s"], r["peak_rss_bytes"]
        lines.append(
            f"{r['workload']:12s} {m['maskaudit']:11.3f} {m['peer']:8.3f} {r['ratio']:6.3f} "
            f"{r['peer_run_median_s']:8.3f} {m['floor']:8.3f} {r['floor_overhead']:+8.1%} "
            f"{r['floor_cpu_overhead']:+8.1%} "
            f"{rss['maskaudit'] / 2**20:7.0f}Mi "
            f"{rss['peer'] / 2**20:7.0f}Mi {r['tokens_per_s']['maskaudit']:11.0f} "
            f"{r['tokens_per_s']['peer']:11.0f}")
    for r in results.values():
        for who, t in r["median_s"].items():
            if who not in ("maskaudit", "peer", "floor"):
                lines.append(f"  variant {who} on {r['workload']}: {t:.3f} s "
                             f"({t / r['median_s']['maskaudit']:.3f}x maskaudit), "
                             f"peak RSS {r['peak_rss_bytes'][who] / 2**20:.0f} MiB")
    lines.append("")
    lines.append("targets:")
    targets = []

    def target(text, ok):
        targets.append(ok)
        lines.append(f"  [{mark(ok):7s}] {text}")

    if "ci" in results:
        r = results["ci"]["ratio"]
        target(f"CI-sized wall <= {CI_RATIO}x the peer: {r:.3f}x", r <= CI_RATIO)
    if "compute" in results:
        r = results["compute"]["ratio"]
        target(f"compute-bound wall <= {COMPUTE_RATIO}x the peer: {r:.3f}x", r <= COMPUTE_RATIO)
        o = results["compute"]["floor_overhead"]
        target(f"compute-bound overhead over forward-only <= {FLOOR_OVERHEAD:.0%}: {o:+.1%}",
               o <= FLOOR_OVERHEAD)
    if "scale" in results:
        o = results["scale"]["floor_overhead"]
        target(f"scale overhead over forward-only <= {FLOOR_OVERHEAD:.0%}: {o:+.1%}",
               o <= FLOOR_OVERHEAD)
    for name, r in results.items():
        ours, peer = r["peak_rss_bytes"]["maskaudit"], r["peak_rss_bytes"]["peer"]
        target(f"{name}: peak RSS <= the peer's: {ours / 2**20:.0f} MiB vs {peer / 2**20:.0f} MiB",
               ours <= peer)
    if "compute" in results and "scale" in results:
        a = results["compute"]["peak_rss_bytes"]["maskaudit"]
        b = results["scale"]["peak_rss_bytes"]["maskaudit"]
        target(f"RSS flat when rows grow 10x (within {RSS_FLAT:.0%}): {a / 2**20:.0f} MiB -> "
               f"{b / 2**20:.0f} MiB ({b / a - 1:+.1%})", abs(b / a - 1) <= RSS_FLAT)
    if "large-vocab" in results:
        ours = results["large-vocab"]["peak_rss_bytes"]["maskaudit"]
        target(f"large vocabulary within 24 GiB: peak RSS {ours / GiB:.2f} GiB "
               f"(peer {results['large-vocab']['peak_rss_bytes']['peer'] / GiB:.2f} GiB)",
               ours <= LARGE_VOCAB_RSS)
    for name in GPU_WORKLOADS:
        if name not in results:
            continue
        r = results[name]
        t = r["tokens_per_s"]
        ratio = t["maskaudit"] / t["peer"]
        mode = f"{r['run_dtype']}{' TF32' if r['ran_tf32'] else ''}"
        if r["mfu"]:
            lines.insert(-1 - len(targets), f"{name} ({mode}): model FLOPs utilisation "
                         f"(2 x {r['params'] / 1e6:.1f}M params x tokens/s / 790 TFLOP/s) "
                         f"maskaudit {r['mfu']['maskaudit']:.1%}, peer {r['mfu']['peer']:.1%}, "
                         f"floor {r['mfu']['floor']:.1%}")
        o = r["floor_overhead"]
        if r["run_dtype"] in ("bfloat16", "float16"):
            target(f"{name} ({mode}): tokens/s >= {GPU_BF16_PEER}x the peer: {t['maskaudit']:.0f} "
                   f"vs {t['peer']:.0f} tokens/s = {ratio:.3f}x", ratio >= GPU_BF16_PEER)
            target(f"{name} ({mode}): overhead over forward-only <= {GPU_BF16_FLOOR:.0%}: "
                   f"{o:+.1%}", o <= GPU_BF16_FLOOR)
        else:
            target(f"{name} ({mode}): tokens/s >= 1.0x the peer: {t['maskaudit']:.0f} vs "
                   f"{t['peer']:.0f} tokens/s = {ratio:.3f}x", ratio >= 1.0)
            target(f"{name} ({mode}): overhead over forward-only <= {GPU_F32_FLOOR:.0%}: "
                   f"{o:+.1%}", o <= GPU_F32_FLOOR)
    return "\n".join(lines), all(targets)


def main():
    venv = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = venv / "maskaudit" / "venv-torch-2.11.0" / "bin" / "python"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CPU_DEFAULT),
                    help="comma-separated workloads: " + ", ".join(WORKLOADS))
    ap.add_argument("--reps", type=int, default=0, help="timed rounds (default: per workload)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (page cache)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--tf32", default="off", choices=("on", "off"))
    ap.add_argument("--python", default=os.environ.get("PYTHON") or str(venv))
    ap.add_argument("--maskaudit", type=Path, default=ROOT / "target/release/maskaudit")
    ap.add_argument("--floor", type=Path,
                    default=ROOT / "target/release/examples/forward_only")
    ap.add_argument("--dir", type=Path, default=ROOT / "target/bench",
                    help="where generated workloads go")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=BINARY",
                    help="another maskaudit build to time alongside")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set for every contender alike (e.g. OMP_WAIT_POLICY=passive)")
    args = ap.parse_args()
    if not Path(args.python).exists():
        args.python = shutil.which(args.python) or args.python
    args.dir.mkdir(parents=True, exist_ok=True)

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in WORKLOADS:
            sys.exit(f"unknown workload {n}; one of {', '.join(WORKLOADS)}")
    load_before = load_average()
    log(f"load average {' '.join(load_before)}; {os.cpu_count()} CPUs")
    results = {n: bench(args, n, WORKLOADS[n], args.dir) for n in names}
    load_after = load_average()
    text, ok = summary(results, args.device, args.env, load_before, load_after)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "dtype": args.dtype,
                                         "tf32": args.tf32, "load_before": load_before,
                                         "load_after": load_after, "results": results},
                                        indent=2))
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
