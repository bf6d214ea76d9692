#!/usr/bin/env python3
"""maskaudit on the exporter's SDPA trace against a transformers script (docs/performance.md).

    hf_speed.py MASKAUDIT [--dir /tmp/bench/hf-speed] [--reps 3] [--out OUT]

Needs a GPU, PyTorch 2.11 with CUDA and transformers in this python. Builds, once, in --dir:
transformers' Qwen2ForCausalLM in Qwen2-0.5B's shape (24 x 896, GQA 14/2, SwiGLU 4864,
vocabulary 151936; random init, seed 0) saved in bfloat16, and the exporter's trace of it on
the GPU with its defaults (SDPA attention, the packed layout) and with `--attention eager`.
The data: 256 rows of 1024-2048 tokens (prompt labels -100), run in batches of 8; and 64
packed rows of 2048 tokens, each 2-5 documents with restarting `position_ids`, as trl's
padding-free collator writes them.

Then, whole process against whole process (Python's start and imports included, timed from
outside): `hf_script.py` with SDPA against `maskaudit check` on the SDPA trace, --reps times
each, alternating; once each with eager attention; once each on the packed rows; maskaudit
once more with MASKAUDIT_SHAPE_BUCKETS=0 (each batch at its own length). The
script's own loop time is reported too. Targets (issue 22): maskaudit's whole run >= 1.3x
faster than the script's whole run, and no slower than the script's loop alone. MFU is
2 x parameters x tokens / seconds over the bf16 matrix rate measured here (an 8192^3 product),
attention's own FLOPs left out. The masked token means must agree to 1e-2 relative (both run
the model in bfloat16, through different kernels).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXPORTER = HERE.parent / "python" / "maskaudit" / "export.py"
SHAPE = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
             tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
BATCH = 8
WHOLE_TARGET = 1.3
LOOP_TARGET = 1.0
AGREE = 1e-2


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def prepare(d: Path, skip_eager: bool) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    hf = d / "hf"
    config = transformers.Qwen2Config(**SHAPE)
    if not (hf / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.Qwen2ForCausalLM(config)
        model.to(torch.bfloat16).save_pretrained(hf)
        del model
        torch.cuda.empty_cache()
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.Qwen2ForCausalLM(config).parameters())
    for name, extra in (("sdpa.pt", []), ("eager.pt", ["--attention", "eager"]))[:2 - skip_eager]:
        if not (d / name).exists():
            t = time.perf_counter()
            subprocess.run([sys.executable, str(EXPORTER), str(hf), str(d / name), "--dtype",
                            "bfloat16", "--device", "cuda", "--trace-length", "2048",
                            "--max-verify-length", "2048",
                            *extra], check=True, stdout=subprocess.DEVNULL)
            extra_files = {"maskaudit.json": ""}
            torch.jit.load(str(d / name), map_location="cpu", _extra_files=extra_files)
            record = json.loads(extra_files["maskaudit.json"])
            log(f"exported {name} in {time.perf_counter() - t:.0f} s: attention "
                f"{record.get('attention')}, layouts {record.get('layouts')}; fallbacks: "
                f"{record.get('attention_fallback')} / {record.get('layout_fallback')}")
    rng = random.Random(1)
    if not (d / "padded.jsonl").exists():
        with open(d / "padded.jsonl", "w") as f:
            for i in range(256):
                n = rng.randint(1024, 2048)
                ids = [rng.randrange(1, SHAPE["vocab_size"]) for _ in range(n)]
                prompt = rng.randint(1, n // 4)
                f.write(json.dumps({"input_ids": ids,
                                    "labels": [-100] * prompt + ids[prompt:]}) + "\n")
    if not (d / "packed.jsonl").exists():
        with open(d / "packed.jsonl", "w") as f:
            for i in range(64):
                docs = rng.randint(2, 5)
                cuts = sorted(rng.sample(range(64, 2048 - 64), docs - 1))
                lens = [b - a for a, b in zip([0] + cuts, cuts + [2048])]
                ids = [rng.randrange(1, SHAPE["vocab_size"]) for _ in range(2048)]
                pos = [p for n in lens for p in range(n)]
                # trl's DataCollatorWithFlattening: -100 on each document's first token.
                labels = [-100 if p == 0 else t for p, t in zip(pos, ids)]
                f.write(json.dumps({"input_ids": ids, "labels": labels,
                                    "position_ids": pos}) + "\n")
    return params


def timed(cmd, env=None):
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    wall = time.perf_counter() - t
    try:
        out = json.loads(p.stdout[p.stdout.index("{"):])
    except ValueError:
        sys.exit(f"{' '.join(map(str, cmd))} exit {p.returncode}: {p.stderr[-2000:]}")
    return wall, out, p.returncode, p.stderr


def script(d, data, attention):
    wall, out, rc, err = timed([sys.executable, str(HERE / "hf_script.py"), str(d / "hf"),
                                str(d / data), "--batch-size", str(BATCH), "--attention",
                                attention])
    if rc:
        sys.exit(f"hf_script.py exit {rc}: {err[-2000:]}")
    return {"wall_s": wall, "loop_s": out["loop_s"], "tokens": out["tokens"],
            "mean": out["masked_token_mean"]}


def maskaudit(binary, d, model, data, timing=False, env=None):
    env = dict(env or {}, **({"MASKAUDIT_TIMING": "1"} if timing else {}))
    wall, out, rc, err = timed([binary, "check", str(d / model), str(d / data), "--pad-id", "0",
                                "--batch-size", str(BATCH), "--device", "cuda", "--format",
                                "json", "--quiet"], env)
    if rc not in (0, 1):
        sys.exit(f"maskaudit exit {rc}: {err[-2000:]}")
    codes = sorted({f["code"] for f in out.get("findings", [])})
    return {"wall_s": wall, "mean": out["losses"]["masked_token_mean"], "verdict":
            out["verdict"], "codes": codes, "timing": err if timing else ""}


def matmul_rate():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    n = 50
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * n / (time.perf_counter() - t)


def main():
    # The binary finds libtorch in this python's torch (as bench/gpu.sh does).
    lib = Path(torch.__file__).parent / "lib"
    os.environ["LD_LIBRARY_PATH"] = f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("maskaudit")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench/hf-speed"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-eager", action="store_true",
                    help="skip the eager export and its two runs")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    binary = str(Path(args.maskaudit).resolve())
    params = prepare(args.dir, args.no_eager)
    rate = matmul_rate()
    log(f"{torch.cuda.get_device_name()}: bf16 8192^3 product {rate / 1e12:.0f} TFLOP/s; "
        f"{params / 1e6:.1f}M parameters")
    # One untimed run of each, so both start from warm caches (disk, NVRTC kernel cache).
    script(args.dir, "padded.jsonl", "sdpa")
    maskaudit(binary, args.dir, "sdpa.pt", "padded.jsonl")
    runs = {"script sdpa": [], "maskaudit sdpa": []}
    for _ in range(args.reps):
        runs["script sdpa"].append(script(args.dir, "padded.jsonl", "sdpa"))
        runs["maskaudit sdpa"].append(maskaudit(binary, args.dir, "sdpa.pt", "padded.jsonl"))
    if not args.no_eager:
        runs["script eager"] = [script(args.dir, "padded.jsonl", "eager")]
        runs["maskaudit eager trace"] = [maskaudit(binary, args.dir, "eager.pt",
                                                   "padded.jsonl")]
    # Each batch at its own length: a new cuDNN attention plan for almost every batch.
    runs["maskaudit, own lengths"] = [maskaudit(binary, args.dir, "sdpa.pt", "padded.jsonl",
                                                env={"MASKAUDIT_SHAPE_BUCKETS": "0"})]
    runs["script sdpa, packed"] = [script(args.dir, "packed.jsonl", "sdpa")]
    runs["maskaudit sdpa, packed"] = [maskaudit(binary, args.dir, "sdpa.pt", "packed.jsonl")]
    timing = maskaudit(binary, args.dir, "sdpa.pt", "padded.jsonl", timing=True)["timing"]

    tokens = {"padded": runs["script sdpa"][0]["tokens"],
              "packed": runs["script sdpa, packed"][0]["tokens"]}
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"bf16 matrix rate {rate / 1e12:.0f} TFLOP/s (8192^3)",
             f"model: Qwen2-0.5B shape, {params / 1e6:.1f}M parameters, bf16; padded: 256 rows "
             f"of 1024-2048 ({tokens['padded']} tokens), packed: 64 x 2048 ({tokens['packed']} "
             f"tokens); batches of {BATCH}",
             f"{'run':24s} {'whole s':>8s} {'loop s':>7s} {'tokens/s':>9s} {'MFU':>6s}  "
             f"masked mean"]
    med = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        loop = statistics.median(r["loop_s"] for r in rs) if "loop_s" in rs[0] else None
        n = tokens["packed" if "packed" in name else "padded"]
        secs = loop if loop is not None else wall
        med[name] = {"wall_s": wall, "loop_s": loop, "mean": rs[0]["mean"],
                     "tokens_per_s": n / secs, "mfu": 2 * params * n / secs / rate,
                     "verdict": rs[0].get("verdict"), "codes": rs[0].get("codes")}
        m = med[name]
        lines.append(f"{name:24s} {wall:8.2f} {loop if loop is not None else float('nan'):7.2f} "
                     f"{m['tokens_per_s']:9.0f} {m['mfu']:6.1%}  {m['mean']:.6f}"
                     + (f"  {m['verdict']} {','.join(m['codes'])}" if m["verdict"] else ""))
    lines.append("(script: tokens/s and MFU over its loop; maskaudit: over its whole process)")
    ok = True
    for label, ours, theirs, key, target in (
            ("whole process", "maskaudit sdpa", "script sdpa", "wall_s", WHOLE_TARGET),
            ("script's loop alone", "maskaudit sdpa", "script sdpa", "loop_s", LOOP_TARGET),
            ("packed, whole process", "maskaudit sdpa, packed", "script sdpa, packed", "wall_s",
             None)):
        ratio = med[theirs][key] / med[ours]["wall_s"]
        met = target is None or ratio >= target
        ok &= met
        lines.append(f"  [{'met    ' if met else 'NOT MET'}] {label}: script "
                     f"{med[theirs][key]:.2f} s / maskaudit {med[ours]['wall_s']:.2f} s = "
                     f"{ratio:.2f}x" + (f" (target >= {target}x)" if target else " (reported)"))
    for ours, theirs in (("maskaudit sdpa", "script sdpa"),
                         ("maskaudit, own lengths", "script sdpa"),
                         ("maskaudit sdpa, packed", "script sdpa, packed"),
                         ("maskaudit eager trace", "script eager")):
        if ours not in med:
            continue
        rel = abs(med[ours]["mean"] - med[theirs]["mean"]) / abs(med[theirs]["mean"])
        agree = rel <= AGREE
        ok &= agree
        lines.append(f"  [{'met    ' if agree else 'NOT MET'}] {ours} agrees with {theirs}: "
                     f"{rel:.2e} relative (<= {AGREE})")
    if "maskaudit, own lengths" in med:
        a, b = med["maskaudit sdpa"]["mean"], med["maskaudit, own lengths"]["mean"]
        lines.append(f"  maskaudit with rounded batch shapes against each batch at its own "
                     f"length: {abs(a - b) / abs(b):.2e} relative")
    lines.append("maskaudit phases (MASKAUDIT_TIMING=1):")
    lines.extend("  " + t for t in timing.strip().splitlines()[-12:])
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hf_speed.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "rate": rate, "params": params,
             "tokens": tokens, "runs": runs, "median": med}, indent=1))
        (args.out / "hf_speed.txt").write_text("\n".join(lines) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
