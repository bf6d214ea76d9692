#!/usr/bin/env python3
"""Real trl and transformers training pipelines on a tiny Llama: the micro-batches a trainer
feeds its model, written as maskaudit reads them, with transformers' own loss of each
(run by `make hf-models`, read by tests/trl_pipelines.rs).

    trl_pipelines.py [--out DIR]        (default target/hf-models/trl)

Nothing is downloaded: a word-level tokenizer and a random-init Llama (vocabulary 160) are made
here, saved with save_pretrained as a user would, and the model is exported with
tools/maskaudit-export.py to DIR/model.pt. Every case is a correct setup, so maskaudit must give
it no warning and no error, and its masked token mean must equal the trainer's loss:

    sft_completion_only   trl SFTTrainer on prompt/completion pairs (completion_only_loss, the
                          default), pad != eos, batches from the trainer's own dataloader
    sft_pad_is_eos        the same with the tokenizer's pad token = its eos token
    sft_text              trl SFTTrainer on plain text rows (every token trained)
    pretrain_hf_collator  transformers' DataCollatorForLanguageModeling(mlm=False), pad != eos
    packed_position_ids   trl's DataCollatorForLanguageModeling(padding_free=True): one row of
                          several documents a batch, position_ids restarting at 0, no attention
                          mask, the first label of each document -100
    packed_cu_seqlens     the same rows with cu_seqlens instead of position_ids
    packed_4d_mask        the same rows with a 4D block-diagonal attention_mask [1, 1, T, T],
                          also as data.parquet
    packed_2d_mask        the same rows with a 2D [T, T] mask, only as data.parquet

The packed cases are audited at batch size 1 (the trainer's) and 4 (token_mean is a token
mean over all batches, so it does not change), through model.pt (the exporter's default
layout, documents kept apart) and through model_padded.pt (--layout padded: no position ids,
so maskaudit splits packed rows into their documents). model_crossing.pt takes position ids but
lets documents attend across, under model.pt's record: the packing probe must fail it.

Per case, DIR/<case>/data.jsonl holds the collated batches row by row (input_ids,
attention_mask, labels exactly as the model receives them, padding included) and
DIR/<case>/expected.json: {"batch_size", "pad_id", "eos_id", "batches", "trained",
"token_mean"}, where token_mean = Σ_b loss_b·n_b / Σ_b n_b over transformers' loss of each
batch (model(**batch).loss, the mean over its n_b shifted labels that are not -100).

Skipped when DIR/.stamp matches this script, the exporter and the library versions.
"""

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[2]
EXPORTER = ROOT / "python" / "maskaudit" / "export.py"
PAD, BOS, EOS = 0, 1, 2
VOCAB = 160
BATCH_SIZE = 4
N_ROWS = 14  # a partial last batch
SEED = 4321


def stamp_text() -> str:
    from importlib.metadata import version

    h = hashlib.sha256()
    for path in (Path(__file__), EXPORTER):
        h.update(path.read_bytes())
    libs = " ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "trl"))
    return f"{h.hexdigest()} {libs}\n"


def tokenizer(pad_is_eos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>" if pad_is_eos else "<pad>",
        unk_token="w3",
    )


def model_dir(tmp: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    path = tmp / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer(False).save_pretrained(path)
    return path


def export(hf_dir: Path, out: Path, *extra: str) -> None:
    sys.dont_write_bytecode = True
    spec = importlib.util.spec_from_file_location("maskaudit_export", EXPORTER)
    exporter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exporter)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = exporter.main([str(hf_dir), str(out), *extra])
    if code != 0:
        raise SystemExit(f"the exporter failed ({code}): {err.getvalue()}")


def words(rng, n: int) -> str:
    return " ".join(f"w{int(t)}" for t in rng.integers(3, VOCAB, size=n))


def sft_batches(hf_dir: Path, tmp: Path, pad_is_eos: bool, completion: bool):
    """The micro-batches SFTTrainer's own dataloader yields, as the model receives them."""
    import numpy as np
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rng = np.random.default_rng(SEED)
    if completion:
        rows = [{"prompt": words(rng, int(rng.integers(1, 8))),
                 "completion": " " + words(rng, int(rng.integers(1, 12)))} for _ in range(N_ROWS)]
    else:
        rows = [{"text": words(rng, int(rng.integers(2, 20)))} for _ in range(N_ROWS)]
    args = SFTConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=BATCH_SIZE, max_steps=1,
        report_to=[], seed=SEED, data_seed=SEED, dataloader_drop_last=False, use_cpu=True,
        dataset_num_proc=None, save_strategy="no", logging_strategy="no",
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(hf_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer(pad_is_eos),
    )
    return trainer.model, list(trainer.get_train_dataloader())


def hf_collator_batches(hf_dir: Path):
    import numpy as np
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

    rng = np.random.default_rng(SEED)
    tok = tokenizer(False)
    texts = [words(rng, int(rng.integers(2, 20))) for _ in range(N_ROWS)]
    encoded = [tok(t + " </s>") for t in texts]
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    batches = [collate(encoded[i:i + BATCH_SIZE]) for i in range(0, N_ROWS, BATCH_SIZE)]
    return AutoModelForCausalLM.from_pretrained(hf_dir), batches


def padding_free_batches(hf_dir: Path):
    """trl's padding-free collator on tokenized rows: one packed row a batch."""
    import numpy as np
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rng = np.random.default_rng(SEED)
    tok = tokenizer(False)
    texts = [words(rng, int(rng.integers(2, 20))) for _ in range(N_ROWS)]
    encoded = [{"input_ids": tok(t + " </s>")["input_ids"]} for t in texts]
    collate = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)
    batches = [collate(encoded[i:i + BATCH_SIZE]) for i in range(0, N_ROWS, BATCH_SIZE)]
    return AutoModelForCausalLM.from_pretrained(hf_dir), batches


def packed_fields(row: dict, layout: str) -> dict:
    """A padding-free row with its documents given by `layout`."""
    pos = row["position_ids"]
    if layout == "packed_position_ids":
        return row
    out = {k: v for k, v in row.items() if k != "position_ids"}
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    if layout == "packed_cu_seqlens":
        out["cu_seqlens"] = starts
    else:
        doc = [sum(1 for s in starts[1:-1] if s <= i) for i in range(len(pos))]
        mask = [[int(j <= i and doc[i] == doc[j]) for j in range(len(pos))]
                for i in range(len(pos))]
        out["attention_mask"] = mask if layout == "packed_2d_mask" else [[mask]]
    return out


def write_parquet(path: Path, rows) -> None:
    """Rows as a Parquet file (pyarrow infers nested lists for a 2D or 4D mask)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def crossing_model(hf_dir: Path, good: Path, out: Path) -> None:
    """A trace that takes position ids but lets documents attend across (a plain 2D mask), with
    the record of a good export, which claims the packed layout: maskaudit's packing probe must
    catch it."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()

    class Crossing(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).logits

    ids = torch.randint(3, VOCAB, (2, 12))
    example = (ids, torch.ones_like(ids), torch.arange(12).expand(2, 12))
    with torch.no_grad():
        traced = torch.jit.trace(Crossing(model), example, strict=False, check_trace=False)
    extra = {"maskaudit.json": ""}
    torch.jit.load(str(good), _extra_files=extra)
    torch.jit.save(traced, str(out), _extra_files=extra)


def write_packed(out: Path, model, batches) -> None:
    """The padding-free batches, with transformers' loss of each, in the three layouts."""
    import torch

    model.eval()
    total, trained, rows = 0.0, 0, []
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "labels")}
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        # Without a cache, as in training: transformers then keeps the documents apart by
        # their position ids (with one, its mask lets them attend across).
        with torch.no_grad():
            loss = model(**batch, use_cache=False).loss.double().item()
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += loss * n
        trained += n
        rows.append({k: batch[k][0].tolist() for k in batch})
    for layout in ("packed_position_ids", "packed_cu_seqlens", "packed_4d_mask"):
        case = out / layout
        case.mkdir(parents=True, exist_ok=True)
        (case / "data.jsonl").write_text("".join(
            json.dumps(packed_fields(r, layout), separators=(",", ":")) + "\n" for r in rows))
        # Parquet reads block masks too: the 4D mask, and a 2D one written only as Parquet.
        if layout == "packed_4d_mask":
            write_parquet(case / "data.parquet", [packed_fields(r, layout) for r in rows])
            two_d = out / "packed_2d_mask"
            two_d.mkdir(parents=True, exist_ok=True)
            write_parquet(two_d / "data.parquet",
                          [packed_fields(r, "packed_2d_mask") for r in rows])
        expected = {"batch_size": 1, "pad_id": PAD, "eos_id": EOS, "batches": len(batches),
                    "trained": trained, "token_mean": total / trained}
        for folder in (case, out / "packed_2d_mask"):
            if folder.is_dir():
                (folder / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


def write_case(out: Path, model, batches, pad_id: int) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    total, trained, lines = 0.0, 0, []
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            loss = model(**batch).loss.double().item()
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += loss * n
        trained += n
        for r in range(batch["input_ids"].shape[0]):
            lines.append(json.dumps({k: batch[k][r].tolist() for k in batch},
                                    separators=(",", ":")))
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    expected = {"batch_size": BATCH_SIZE, "pad_id": pad_id, "eos_id": EOS,
                "batches": len(batches), "trained": trained, "token_mean": total / trained}
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


def main(argv) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else (
        ROOT / "target" / "hf-models" / "trl")
    stamp = out / ".stamp"
    if stamp.is_file() and stamp.read_text() == stamp_text():
        print(f"trl pipelines up to date in {out}")
        return 0
    import torch

    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir = model_dir(tmp)
        export(hf_dir, out / "model.pt")
        export(hf_dir, out / "model_padded.pt", "--layout", "padded")
        crossing_model(hf_dir, out / "model.pt", out / "model_crossing.pt")
        cases = {
            "sft_completion_only": lambda: sft_batches(hf_dir, tmp / "a", False, True),
            "sft_pad_is_eos": lambda: sft_batches(hf_dir, tmp / "b", True, True),
            "sft_text": lambda: sft_batches(hf_dir, tmp / "c", False, False),
            "pretrain_hf_collator": lambda: hf_collator_batches(hf_dir),
        }
        for name, make in cases.items():
            model, batches = make()
            pad_id = EOS if name == "sft_pad_is_eos" else PAD
            write_case(out / name, model, batches, pad_id)
            print(f"ok   {name}: {len(batches)} batches")
        model, batches = padding_free_batches(hf_dir)
        write_packed(out, model, batches)
        print(f"ok   packed: {len(batches)} batches")
    stamp.write_text(stamp_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
