#!/usr/bin/env python3
"""Builds tiny Hugging Face models, exports each with tools/maskaudit-export.py, and writes what
maskaudit's Rust tests read, into target/hf-models/ (run by `make test` before `cargo test`).

    build_models.py [--device cpu|cuda|cuda:N] [--out DIR]

--device exports the models there (the exporter's --device) and runs the eager references there;
bench/gpu.sh builds a CUDA set this way to check the exports on the GPU (bench/hf_gpu.py).

Nothing is downloaded: every model is a random-init config (hidden 32, 2 layers, vocabulary 160,
max_position_embeddings 64 where it applies) saved with save_pretrained to a temporary
directory and exported from there, as a user would. Per architecture <arch> in ARCHS:

    target/hf-models/<arch>/model.pt       the export (record inside: extra/maskaudit.json)
    target/hf-models/<arch>/data.jsonl     13 ragged rows (lengths 3..40), `input_ids` and
                                           `labels` (-100 on the prompt tokens of some rows)
    target/hf-models/<arch>/expected.json  the aggregates of the eager model (below)

`llama-bf16/` is the Llama model exported with --dtype bfloat16 (its expected.json from the
eager bfloat16 model, logits upcast to float32 before the cross-entropy).

expected.json is fixtures/expected.json's case layout, computed the same way from the eager
model (transformers' default attention, not the exporter's eager attention):
rows batched in file order by 4, right-padded with pad id 0, attention_mask 1 on real tokens;
ℓ[b,t] = cross_entropy(reduction='none') of the logits at t against input_ids[t+1];
m[b,t] = (labels[t+1] != -100), 0 on padding; positions = Σ over batches of rows × (T−1);
`losses` holds all five aggregates; `masked_token_mean`, `all_positions_mean`, `positions`
and `supervised_positions` are also at the top level.

Deliberately wrong traces, without a record, for the signature tests (from the Llama model):

    target/hf-models/llama_posids.pt   forward(input_ids, position_ids) -> logits
    target/hf-models/llama_labels.pt   forward(input_ids, labels) -> (loss, logits)
    target/hf-models/llama_3arg.pt     forward(input_ids, attention_mask, labels) -> (loss, logits)

It also checks the exporter's failures (no directory, no config.json, not a causal LM, a
bidirectional model, and with --no-substitutes a trace that cannot be saved (Bloom) and one
that fails verification (dynamic RoPE): exit status, one stderr line, no file), and that
those two export with the stand-ins.
Ends with `export: N passed, M failed` and exits non-zero on any failure. Skipped when
target/hf-models/.stamp matches the hash of this script, the exporter and the library versions.
"""

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[2]
EXPORTER = ROOT / "python" / "maskaudit" / "export.py"
OUT = ROOT / "target" / "hf-models"
# --device: where the models are exported (the exporter's --device) and the eager references
# run; bench/gpu.sh uses cuda. The wrong traces and failure checks stay on the CPU.
DEVICE = "cpu"

PAD, BOS, EOS = 0, 1, 2
# all_positions_mean's tolerance between trace and eager on a GPU (see its comparison).
GPU_PAD_TOL = 1e-3
VOCAB = 160
MAX_POS = 64
BATCH_SIZE = 4
N_ROWS = 13  # a partial last batch at batch size 4
SEED = 1234

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POS,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
# model_type -> config keyword arguments (AutoConfig.for_model).
ARCHS: Dict[str, dict] = {
    "llama": COMMON,
    "qwen2": COMMON,
    "gemma2": dict(COMMON, head_dim=8, sliding_window=16),
    "gpt2": dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POS,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    ),
    "phi3": dict(COMMON, original_max_position_embeddings=MAX_POS),
}


def stamp_text() -> str:
    # Package metadata, not imports: the up-to-date check stays well under a second.
    from importlib.metadata import version

    h = hashlib.sha256()
    for path in (Path(__file__), EXPORTER):
        h.update(path.read_bytes())
    return (f"{h.hexdigest()} torch {version('torch')} transformers {version('transformers')} "
            f"device {DEVICE}\n")


def expected_files() -> List[Path]:
    files = [OUT / f"llama_{k}.pt" for k in ("posids", "labels", "3arg")]
    files.append(OUT / "other_device.pt")
    for arch in list(ARCHS) + ["llama-bf16"]:
        files += [OUT / arch / n for n in ("model.pt", "data.jsonl", "expected.json")]
    return files


def other_device() -> str:
    """other_device.pt: a module that creates a tensor on a device of its own, as a Hugging
    Face model traced on the CPU does (its causal mask, its positions) when it runs on a GPU,
    with a record saying it was traced on CUDA. Scripted, not traced: tracing would run it. On
    the CPU it fails ("not on the expected device"), and maskaudit must say why."""
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    class Fixed(nn.Module):
        def forward(self, input_ids: Tensor) -> Tensor:
            pos = torch.arange(input_ids.shape[1], device=torch.device("meta"))
            return F.one_hot(input_ids, 16).float() + pos.unsqueeze(0).unsqueeze(-1).float()

    record = {"format_version": 1, "forward_args": ["input_ids"], "output": "logits",
              "vocab_size": 16, "exporter": "maskaudit-export 1", "device": "cuda"}
    path = OUT / "other_device.pt"
    torch.jit.save(torch.jit.script(Fixed()), str(path),
                   _extra_files={"maskaudit.json": json.dumps(record)})
    return path.name


def load_exporter():
    sys.dont_write_bytecode = True  # no tools/__pycache__ in the checkout
    spec = importlib.util.spec_from_file_location("maskaudit_export", EXPORTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_exporter(exporter, argv: List[str]):
    """(exit status, stdout, stderr) of the exporter run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = exporter.main(argv)
    return code, out.getvalue(), err.getvalue()


def read_record(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("/extra/maskaudit.json")]
        # torch.jit.save names the archive's folder after the file: <stem>/extra/maskaudit.json
        assert names == [f"{path.stem}/extra/maskaudit.json"], f"{path}: {names}"
        return json.loads(z.read(names[0]))


# ----------------------------------------------------------------------------------------------
# Data and the reference computation (fixtures/generate.py's definitions)
# ----------------------------------------------------------------------------------------------


def make_rows(rng) -> List[dict]:
    rows = []
    lengths = [3, 40] + [int(n) for n in rng.integers(3, 41, size=N_ROWS - 2)]
    rng.shuffle(lengths)
    for i, n in enumerate(lengths):
        ids = [BOS] + [int(t) for t in rng.integers(3, VOCAB, size=n - 2)] + [EOS]
        labels = list(ids)
        if i % 2 == 0:  # a prompt of 1..4 tokens (never the whole row) is not trained
            prompt = min(int(rng.integers(1, 5)), n - 1)
            labels[:prompt] = [-100] * prompt
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def write_jsonl(path: Path, rows: List[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def right_pad(rows: List[List[int]], width: int, value: int) -> List[List[int]]:
    return [r + [value] * (width - len(r)) for r in rows]


def expected_case(name: str, rows: List[dict], logits_of: Callable) -> dict:
    import torch
    import torch.nn.functional as F

    total = masked = supervised = 0.0
    positions = n_batches = 0
    row_means: List[float] = []
    batch_means: List[float] = []
    for start in range(0, len(rows), BATCH_SIZE):
        chunk = rows[start : start + BATCH_SIZE]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor(right_pad([r["input_ids"] for r in chunk], width, PAD))
        attention = torch.tensor(right_pad([[1] * len(r["input_ids"]) for r in chunk], width, 0))
        mask = torch.tensor(
            right_pad([[int(x != -100) for x in r["labels"]] for r in chunk], width, 0)
        )
        logits = logits_of(ids, attention).float()
        b, t, v = logits.shape
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none"
        ).view(b, t - 1).double()
        m = mask[:, 1:].double()
        lm = loss * m
        total += loss.sum().item()
        masked += lm.sum().item()
        supervised += m.sum().item()
        positions += loss.numel()
        n_batches += 1
        for row_sum, row_count in zip(lm.sum(dim=1).tolist(), m.sum(dim=1).tolist()):
            if row_count > 0:
                row_means.append(row_sum / row_count)
        if m.sum().item() > 0:
            batch_means.append(lm.sum().item() / m.sum().item())
    all_mean = total / positions
    token_mean = masked / supervised
    return {
        "name": name,
        "model": "model.pt",
        "data": "data.jsonl",
        "batch_size": BATCH_SIZE,
        "pad_id": PAD,
        "rows": len(rows),
        "batches": n_batches,
        "positions": positions,
        "supervised_positions": int(supervised),
        "padding_fraction": 1.0 - supervised / positions,
        "mask_source": "labels",
        "masked_token_mean": token_mean,
        "all_positions_mean": all_mean,
        "losses": {
            "all_positions_mean": all_mean,
            "masked_token_mean": token_mean,
            "masked_sum_over_all_positions": masked / positions,
            "sequence_mean": sum(row_means) / len(row_means),
            "batch_mean_of_means": sum(batch_means) / len(batch_means),
        },
        "contamination": {
            "absolute": all_mean - token_mean,
            "relative": (all_mean - token_mean) / token_mean,
        },
    }


# ----------------------------------------------------------------------------------------------


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name: str, fn: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            note = fn()
        except Exception as exc:  # noqa: BLE001: reported, counted, and the run goes on
            self.failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
            return
        self.passed += 1
        print(f"ok   {name} ({time.monotonic() - started:.1f} s){': ' + note if note else ''}",
              flush=True)


def parse_args(argv: List[str]) -> None:
    import argparse

    global OUT, DEVICE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=DEVICE, help="cpu (default), cuda or cuda:N")
    p.add_argument("--out", type=Path, default=OUT, help="default target/hf-models")
    args = p.parse_args(argv)
    DEVICE, OUT = args.device, args.out.resolve()


def main(argv: List[str]) -> int:
    parse_args(argv)
    started = time.monotonic()
    stamp = OUT / ".stamp"
    if stamp.is_file() and stamp.read_text() == stamp_text() and all(
        p.is_file() for p in expected_files()
    ):
        print(f"export: {OUT} is up to date")
        return 0

    import numpy as np
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(1)
    exporter = load_exporter()
    rng = np.random.default_rng(SEED)

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    checks = Checks()
    tmp_root = Path(tempfile.mkdtemp(prefix="maskaudit-hf-"))
    hf_dirs: Dict[str, Path] = {}

    def build(arch: str, kwargs: dict) -> Path:
        torch.manual_seed(SEED)
        config = AutoConfig.for_model(arch, **kwargs)
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_root / arch
        model.save_pretrained(path)
        return path

    def export_case(arch: str, hf_dir: Path, dtype: str, out_name: str) -> str:
        out_dir = OUT / out_name
        out_dir.mkdir()
        pt = out_dir / "model.pt"
        code, stdout, stderr = run_exporter(exporter, [str(hf_dir), str(pt), "--dtype", dtype,
                                                        "--device", DEVICE])
        assert code == 0, f"exporter exit {code}: {stderr.strip()}\n{stdout}"
        assert "max relative logit difference" in stdout, stdout
        record = read_record(pt)
        assert record["format_version"] == 1 and record["exporter"] == "maskaudit-export 1"
        # The packed layout where it verifies (Gemma 2's sliding window: padded, and why).
        assert record["forward_args"] in (["input_ids", "attention_mask", "position_ids"],
                                          ["input_ids", "attention_mask"]), record
        assert ("packed_position_ids" in record["layouts"]) == (
            "position_ids" in record["forward_args"]), record
        assert (record["layout_fallback"] is None) == (
            "position_ids" in record["forward_args"]), record
        assert record["output"] == "logits" and record["dtype"] == dtype, record
        assert (record["max_relative_difference"] <= record["tolerance"]
                or record["low_precision_reference"]), record
        assert record["verified_lengths"], record
        assert record["device"] == DEVICE, record

        rows = make_rows(rng)
        write_jsonl(out_dir / "data.jsonl", rows)
        torch_dtype = exporter.DTYPES[dtype]
        eager = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True,
                                                     dtype=torch_dtype).eval().to(DEVICE)
        traced = torch.jit.load(str(pt), map_location=DEVICE).eval()

        def eager_logits(ids, attention):
            with torch.no_grad():
                return eager(input_ids=ids.to(DEVICE), attention_mask=attention.to(DEVICE),
                             use_cache=False).logits.cpu()

        def traced_logits(ids, attention):
            with torch.no_grad():
                args = [ids.to(DEVICE), attention.to(DEVICE)]
                if "position_ids" in record["forward_args"]:
                    args.append(torch.arange(ids.shape[1], device=DEVICE).expand(ids.shape))
                out = traced(*args).cpu()
            assert out.shape[-1] == record["vocab_size"], (out.shape, record["vocab_size"])
            return out

        case = expected_case(out_name, rows, eager_logits)
        through_trace = expected_case(out_name, rows, traced_logits)
        rtol = 1e-5 if dtype == "float32" else 2e-2
        for key, want in case["losses"].items():
            got = through_trace["losses"][key]
            # The padding's logits (all_positions_mean reads them) come from attention rows with
            # every key masked; on a GPU, trace and eager round those apart (Gemma 2: 4e-5).
            padding_on_gpu = key == "all_positions_mean" and DEVICE != "cpu"
            tol = max(rtol, GPU_PAD_TOL) if padding_on_gpu else rtol
            assert abs(got - want) <= tol * abs(want), f"{key}: trace {got} vs eager {want}"
        (out_dir / "expected.json").write_text(json.dumps(case, indent=2) + "\n")
        return (f"{record['architecture']}, vocab {record['vocab_size']}, lengths "
                f"{record['verified_lengths']}, max rel diff "
                f"{record['max_relative_difference']:.1e}, "
                f"masked_token_mean {case['masked_token_mean']:.4f}")

    for arch, kwargs in ARCHS.items():
        def one(arch=arch, kwargs=kwargs):
            hf_dirs[arch] = build(arch, kwargs)
            return export_case(arch, hf_dirs[arch], "float32", arch)

        checks.run(f"export {arch}", one)
    checks.run("export llama --dtype bfloat16",
               lambda: export_case("llama", hf_dirs["llama"], "bfloat16", "llama-bf16"))

    def low_precision_reference() -> str:
        # A deep model at thousands of tokens rounds eager and SDPA apart past bfloat16's
        # tolerance; squeezing the tolerance makes this tiny one do the same. The float32 model
        # must then decide: a right trace passes, one whose documents attend across does not.
        # Larger weights than the default init, so that attending across documents moves the
        # logits by more than bfloat16's rounding.
        torch.manual_seed(SEED)
        hf = tmp_root / "llama-wide"
        AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "llama", **dict(COMMON, initializer_range=0.3))).save_pretrained(hf)
        tolerance = exporter.DEFAULT_TOLERANCE["bfloat16"]
        document_mask = exporter.document_mask
        exporter.DEFAULT_TOLERANCE["bfloat16"] = 1e-7
        try:
            pt = tmp_root / "lp.pt"
            code, stdout, stderr = run_exporter(exporter, [str(hf), str(pt), "--dtype",
                                                           "bfloat16"])
            assert code == 0, stderr
            record = read_record(pt)
            assert record["attention"] == "sdpa" and record["layout_fallback"] is None, record
            lp = record["low_precision_reference"]
            assert lp and lp["checks"] > 0, record
            assert lp["worst_trace_vs_float32"] <= 2 * lp["worst_eager_vs_float32"], record
            assert record["max_relative_difference"] > record["tolerance"], record
            # Documents that see each other: past the float32 rule, so the padded layout.
            exporter.document_mask = lambda pos, mask, dtype: document_mask(
                torch.arange(pos.shape[1], device=pos.device).expand(pos.shape), mask, dtype)
            code, stdout, stderr = run_exporter(exporter, [str(hf), str(pt), "--dtype",
                                                           "bfloat16"])
            assert code == 0, stderr
            crossing = read_record(pt)
            assert crossing["layouts"] == ["padded"], crossing
            assert "packed rows differ" in crossing["layout_fallback"], crossing
            pt.unlink()
        finally:
            exporter.DEFAULT_TOLERANCE["bfloat16"] = tolerance
            exporter.document_mask = document_mask
        return (f"tolerance 1e-7: passed against float32 ({lp['checks']} checks, trace "
                f"{lp['worst_trace_vs_float32']:.1e}, eager {lp['worst_eager_vs_float32']:.1e}); "
                f"documents attending across fell back to padded")

    checks.run("bfloat16 past the tolerance: held against the float32 model",
               low_precision_reference)

    # Deliberately wrong signatures, traced from the Llama model, without a record.
    def wrong_traces() -> str:
        from torch import nn

        model = AutoModelForCausalLM.from_pretrained(
            hf_dirs["llama"], local_files_only=True, attn_implementation="eager"
        ).eval()

        class PositionIds(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, position_ids):
                return self.m(input_ids=input_ids, position_ids=position_ids,
                              use_cache=False).logits

        class Labels(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, labels):
                out = self.m(input_ids=input_ids, labels=labels, use_cache=False)
                return out.loss, out.logits

        class ThreeArgs(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, labels):
                out = self.m(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                             use_cache=False)
                return out.loss, out.logits

        g = torch.Generator().manual_seed(SEED)
        ids = torch.randint(3, VOCAB, (2, 12), generator=g)
        attention = torch.ones_like(ids)
        attention[1, 8:] = 0
        ids = ids.masked_fill(attention.eq(0), PAD)
        labels = ids.masked_fill(attention.eq(0), -100)
        labels[:, :2] = -100
        positions = torch.arange(12).unsqueeze(0).expand(2, -1)
        specs = {
            "llama_posids.pt": (PositionIds(model), (ids, positions)),
            "llama_labels.pt": (Labels(model), (ids, labels)),
            "llama_3arg.pt": (ThreeArgs(model), (ids, attention, labels)),
        }
        import warnings

        for name, (module, example) in specs.items():
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module.eval(), example, strict=False,
                                         check_trace=False)
            torch.jit.save(traced, str(OUT / name))
            loaded = torch.jit.load(str(OUT / name))
            with torch.no_grad():
                want = module(*example)
                got = loaded(*example)
            if isinstance(want, tuple):
                assert got[0].dim() == 0 and torch.allclose(got[0], want[0], rtol=1e-5)
                want, got = want[1], got[1]
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
            with zipfile.ZipFile(OUT / name) as z:
                assert not any(n.endswith("maskaudit.json") for n in z.namelist()), name
        return ", ".join(specs)

    if "llama" in hf_dirs:
        checks.run("wrong signatures (no record)", wrong_traces)

    # The exporter's failures: exit status, one line on stderr, nothing left behind.
    def fails(argv: List[str], code: int, needle: str) -> str:
        out = Path(argv[1])
        before = set(out.parent.iterdir())
        got, _, stderr = run_exporter(exporter, argv)
        lines = stderr.strip().splitlines()
        assert got == code, f"exit {got}, want {code}: {stderr}"
        assert len(lines) == 1 and lines[0].startswith("maskaudit-export: error: "), stderr
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
        assert not out.exists() and set(out.parent.iterdir()) == before, "a file was left"
        return lines[0][len("maskaudit-export: error: "):][:110]

    scratch = tmp_root / "out"
    scratch.mkdir()
    no_config = tmp_root / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    checks.run("fails: no such directory",
               lambda: fails([str(tmp_root / "absent"), str(scratch / "m.pt")], 2,
                             "no such directory"))
    checks.run("fails: no config.json",
               lambda: fails([str(no_config), str(scratch / "m.pt")], 2, "no config.json"))

    def not_causal_lm() -> str:
        torch.manual_seed(SEED)
        config = AutoConfig.for_model("distilbert", vocab_size=VOCAB, dim=32, n_layers=1,
                                      n_heads=2, hidden_dim=64)
        transformers.DistilBertModel(config).save_pretrained(tmp_root / "distilbert")
        return fails([str(tmp_root / "distilbert"), str(scratch / "m.pt")], 2,
                     "not a causal language model")

    checks.run("fails: not a causal LM", not_causal_lm)

    def bidirectional() -> str:
        # AutoModelForCausalLM loads BERT (BertLMHeadModel), but without is_decoder it is not
        # causal: verification against eager passes, the causality check must not.
        hf = build("bert", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=MAX_POS, initializer_range=0.3))
        return fails([str(hf), str(scratch / "m.pt")], 1, "not causal")

    checks.run("fails: a bidirectional model", bidirectional)

    def bloom_unsaveable() -> str:
        hf = build("bloom", dict(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4,
                                 pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS))
        note = fails([str(hf), str(scratch / "m.pt"), "--no-substitutes"], 1,
                     "cannot be saved in TorchScript")
        code, stdout, stderr = run_exporter(exporter, [str(hf), str(scratch / "bloom.pt")])
        assert code == 0, stderr
        (scratch / "bloom.pt").unlink()
        return note + " (exported with the stand-in)"

    checks.run("fails: Bloom's GeLU without the stand-in", bloom_unsaveable)

    def dynamic_rope() -> str:
        # Larger weights than the default init, so attention (and so RoPE) matters.
        hf = build("llama", dict(COMMON, num_hidden_layers=1, initializer_range=0.3,
                                 rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
        note = fails([str(hf), str(scratch / "m.pt"), "--no-substitutes",
                      "--layout", "padded", "--attention", "eager"], 1, "dynamic RoPE")
        code, stdout, stderr = run_exporter(exporter, [str(hf), str(scratch / "dyn.pt")])
        assert code == 0, stderr
        assert "past max_position_embeddings" in stdout, stdout
        (scratch / "dyn.pt").unlink()
        return note + " (exported with the stand-in)"

    checks.run("fails: dynamic RoPE without the stand-in", dynamic_rope)

    checks.run("fails: --device nonsense",
               lambda: fails([str(no_config), str(scratch / "m.pt"), "--device", "nonsense"], 2,
                             "--device nonsense"))
    checks.run("a module fixed to another device than it runs on", other_device)

    shutil.rmtree(tmp_root, ignore_errors=True)
    elapsed = time.monotonic() - started
    if checks.failed == 0:
        (OUT / ".stamp").write_text(stamp_text())
    print(f"hf-models in {elapsed:.1f} s -> {OUT}")
    print(f"export: {checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
