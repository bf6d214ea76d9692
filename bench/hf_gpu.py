#!/usr/bin/env python3
"""The exported Hugging Face models on a GPU (bench/gpu.sh, section 0).

    hf_gpu.py MODELS_DIR MASKAUDIT FIXTURES [--device cuda]

MODELS_DIR is what `tests/export/build_models.py --device cuda --out MODELS_DIR` wrote: tiny
random-init configs of five architectures (and Llama in bfloat16) exported with
`maskaudit-export --device cuda`, each with the aggregates of its eager model run on the GPU
(expected.json). For each, `maskaudit check --device cuda --tf32 off` runs twice, with the fused
cross-entropy and with libtorch's (MASKAUDIT_FUSED_CE=0); every aggregate must match the eager
model's to 1e-5 relative (bfloat16: 1e-3), and the number of positions. all_positions_mean,
which reads the padding's logits, to 1e-3 (left out in bfloat16): those come from attention rows
whose every key is masked, which a GPU rounds apart in trace and eager. Then each export on
the CPU, where it was not traced: maskaudit must either agree with the same aggregates or stop
with exit 2 and say where the export was traced, never report other numbers. Last, the
fixtures' odd models on the GPU (non-finite and huge logits, a float16 model, two user losses)
must give the verdicts they give on the CPU. Batches rounded up to fewer shapes on the GPU
(`loss::batch::gpu_columns`) must give what each batch at its own length gives
(MASKAUDIT_SHAPE_BUCKETS=0), every aggregate to 1e-5 (bfloat16: 1e-3), all_positions_mean
included: on the data as it is (right-padded), and on a left-padded copy, whose padding sees no
key and must therefore not be rounded. Prints a line per run; exit 1 on any mismatch.
"""
import json
import os
import subprocess
import sys

# all_positions_mean's tolerance on a GPU (build_models.py says why).
PAD_TOL = 1e-3


def run(binary, args, env=None):
    p = subprocess.run([binary] + args, capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})))
    try:
        return p.returncode, json.loads(p.stdout), p.stderr.strip()
    except ValueError:
        return p.returncode, None, p.stderr.strip()


def check(binary, models, device):
    bad = 0
    # Every model build_models.py wrote: a folder with its expected.json.
    archs = sorted(d for d in os.listdir(models) if os.path.isfile(f"{models}/{d}/expected.json"))
    assert archs, f"no exported models under {models}"
    for arch in archs:
        d = f"{models}/{arch}"
        exp = json.load(open(f"{d}/expected.json"))
        bf16 = arch.endswith("bf16")
        for where, fused in ((device, "1"), (device, "0"), ("cpu", "1")):
            rc, out, err = run(binary, ["check", f"{d}/model.pt", f"{d}/data.jsonl", "--pad-id",
                                        "0", "--batch-size", str(exp["batch_size"]), "--device",
                                        where, "--tf32", "off", "--format", "json", "--quiet"],
                               {"MASKAUDIT_FUSED_CE": fused})
            tag = f"{arch:10s} on {where:6s} fused={fused}"
            if out is None:
                # Off its own device, a clear refusal naming the export's device is right.
                ok = where == "cpu" and rc == 2 and "traced" in err and "\n" not in err
                print(f"{tag} exit {rc}: {err[:300]} {'ok' if ok else 'FAILED'}")
                bad += not ok
                continue
            tol = 1e-3 if bf16 else 1e-5
            rels = {k: abs(out["losses"][k] - v) / abs(v) for k, v in exp["losses"].items()}
            # build_models.py's note: the padding's logits round apart on a GPU (in bf16 they
            # are not compared).
            pad = rels.pop("all_positions_mean")
            if bf16:
                pad = 0.0
            worst = max(rels.values())
            ok = worst <= tol and pad <= PAD_TOL and out["data"]["positions"] == exp["positions"]
            bad += not ok
            print(f"{tag} exit {rc} verdict {out['verdict']} ce {out['model'].get('cross_entropy')} "
                  f"max relative difference from eager {worst:.2e} (tolerance {tol}; "
                  f"all_positions_mean {pad:.1e}, tolerance {PAD_TOL}) "
                  f"{'ok' if ok else 'MISMATCH ' + json.dumps(rels)}")
    return bad


def left_padded(src, dst):
    """Each row of `src` with 1-6 pad tokens in front (attention 0, labels -100)."""
    with open(src) as f, open(dst, "w") as out:
        for i, line in enumerate(f):
            row = json.loads(line)
            k = 1 + i % 6
            ids = [0] * k + row["input_ids"]
            labels = [-100] * k + row.get("labels", row["input_ids"])
            mask = [0] * k + [1] * len(row["input_ids"])
            out.write(json.dumps({"input_ids": ids, "labels": labels, "attention_mask": mask})
                      + "\n")


def rounded_against_own(binary, models, device):
    """Every aggregate with batches rounded up against each batch at its own length."""
    bad = 0
    archs = sorted(d for d in os.listdir(models)
                   if all(os.path.isfile(f"{models}/{d}/{f}")
                          for f in ("expected.json", "model.pt", "data.jsonl")))
    for arch in archs:
        d = f"{models}/{arch}"
        exp = json.load(open(f"{d}/expected.json"))
        left = f"{d}/left_padded.jsonl"
        left_padded(f"{d}/data.jsonl", left)
        tol = 1e-3 if arch.endswith("bf16") else 1e-5
        for name, data in (("right-padded", f"{d}/data.jsonl"), ("left-padded", left)):
            outs = []
            for buckets in ("1", "0"):
                rc, out, err = run(binary, ["check", f"{d}/model.pt", data, "--pad-id", "0",
                                            "--batch-size", str(exp["batch_size"]), "--device",
                                            device, "--tf32", "off", "--format", "json",
                                            "--quiet"], {"MASKAUDIT_SHAPE_BUCKETS": buckets})
                outs.append((rc, out, err))
            (rc, out, err), (rc0, own, err0) = outs
            tag = f"{arch:10s} {name:12s} rounded against own lengths"
            if out is None or own is None:
                print(f"{tag}: exit {rc} / {rc0}: {err[:200]} {err0[:200]} FAILED")
                bad += 1
                continue
            rels = {k: abs(out["losses"][k] - v) / max(abs(v), 1e-30)
                    for k, v in own["losses"].items() if isinstance(v, float)}
            worst = max(rels.values())
            ok = (worst <= tol and rc == rc0 and out["verdict"] == own["verdict"]
                  and out["data"]["positions"] == own["data"]["positions"])
            bad += not ok
            print(f"{tag}: exit {rc} verdict {out['verdict']}, max relative difference "
                  f"{worst:.2e} (tolerance {tol}) {'ok' if ok else 'MISMATCH ' + json.dumps(rels)}")
    return bad


def odd_fixtures(binary, fixtures, device):
    bad = 0
    cases = [["nan_logits.pt", "ragged.jsonl"], ["odd/huge_logits.pt", "ragged.jsonl"],
             ["tiny_lm_half.pt", "ragged.jsonl"],
             ["tiny_lm.pt", "padded_labels.jsonl", "--loss", "losses/reduce_then_mask.pt",
              "--loss-args", "shift_logits,targets,loss_mask"],
             ["tiny_lm.pt", "padded_labels.jsonl", "--loss", "losses/correct_labels.pt"]]
    for case in cases:
        args = [f"{fixtures}/{a}" if a.endswith((".pt", ".jsonl")) else a for a in case]
        seen = []
        for where in ("cpu", device):
            rc, out, err = run(binary, ["check", args[0], args[1], "--pad-id", "0",
                                        "--batch-size", "4", "--device", where, "--format",
                                        "json", "--quiet"] + args[2:])
            seen.append((rc, out["verdict"] if out else err[:120],
                         sorted(f["code"] for f in out["findings"]) if out else None))
        ok = seen[0] == seen[1]
        bad += not ok
        print(f"{' '.join(case)}: cpu {seen[0]} {device} {seen[1]} {'ok' if ok else 'DIFFERENT'}")
    return bad


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__.split("\n\n")[1])
    models, binary, fixtures = sys.argv[1:4]
    device = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--device" else "cuda"
    binary = os.path.abspath(binary)
    bad = check(binary, models, device)
    bad += rounded_against_own(binary, models, device)
    bad += odd_fixtures(binary, fixtures, device)
    print(f"hf_gpu: {'all ok' if bad == 0 else f'{bad} failed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
