#!/usr/bin/env python3
"""`maskaudit.capture` on real trainers (run by `make hf-models`, read by tests/capture.rs).

    capture_runs.py [--out DIR]        (default target/hf-models/capture)

A tiny Llama (tests/export/trl_pipelines.py's, exported to DIR/model.pt) is trained twice for
two optimizer steps with the same seed, once plainly and once with
`maskaudit.capture(trainer, path, steps=1)`: the logged losses must be identical (a capture
never changes training; this script fails otherwise). Cases:

    sft_accumulation   trl SFTTrainer, completion-only, batches of 2, gradient accumulation 2
    plain_loop         a hand-written loop through `maskaudit.capture_forward` (accumulation 2)
    sft_over_all_positions  an SFTTrainer subclass whose compute_loss is F.cross_entropy's
                       default mean over every position (the founding bug)
    sft_eos_masked     pad = eos and a collator that sets every pad id's label to -100
    sft_padding_trained  a collator whose labels are the input ids, padding included
    sft_no_loss_kwargs  model_accepts_loss_kwargs False: each micro-batch's own mean, divided
                       by the accumulation
    sft_packing        packing=True: padding-free rows of several documents
    losses/            transformers' ForCausalLMLoss traced by maskaudit.trace_loss (mean, and
                       with num_items_in_batch); a shape-dependent loss must be refused
    count_before_shift the SFT capture with num_items_in_batch counted before the shift (one
                       token per row too many, as transformers PR 46204 fixed): no expected.json

DIR/<case>/run.parquet is the capture; DIR/<case>/expected.json holds {"batch_size",
"micro_batches", "trained", "trainer_token_mean", "token_mean"}: trainer_token_mean = Σ over
the captured micro-batches of the trainer's loss × its normaliser (num_items_in_batch, or the
micro-batch's own count for a per-micro-batch mean) / Σ trained targets, the captured steps'
token mean as the trainer computed it; token_mean the same from the eager model in float64.

Skipped when DIR/.stamp matches this script, the capture module and the library versions.
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "python"))

import trl_pipelines as tp  # noqa: E402

CAPTURE = ROOT / "python" / "maskaudit" / "capture.py"
LOSS = ROOT / "python" / "maskaudit" / "loss.py"
# One captured step: its micro-batches all run on the weights exported before training, so
# check's numbers equal the trainer's exactly (later steps run on updated weights).
STEPS, BATCH, ACCUM = 1, 2, 2


def stamp_text() -> str:
    h = hashlib.sha256()
    for path in (Path(__file__), CAPTURE, LOSS, tp.EXPORTER):
        h.update(path.read_bytes())
    return h.hexdigest() + " " + tp.stamp_text()


def collator(pad_id: int, mode: str):
    """A hand-written collator with a masking bug: `pad_ids_masked` sets every pad id's label to
    -100 (with pad == eos that masks every EOS: transformers #23530), `labels_are_input_ids`
    keeps the labels over the padding (the padding is trained)."""
    import torch

    def collate(examples):
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, e in enumerate(examples):
            ids[r, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            attention[r, :len(e["input_ids"])] = 1
        if mode == "pad_ids_masked":
            labels = ids.masked_fill(ids == pad_id, -100)
        else:
            labels = ids.clone()
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate


def sft(hf_dir: Path, tmp: Path, path, over_all_positions: bool = False, bug: str = "",
        packing: bool = False):
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    import maskaudit

    torch.manual_seed(tp.SEED)
    rng = np.random.default_rng(tp.SEED)
    rows = [{"prompt": tp.words(rng, int(rng.integers(1, 8))),
             "completion": " " + tp.words(rng, int(rng.integers(1, 12)))} for _ in range(16)]
    args = SFTConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS + 1, report_to=[], seed=tp.SEED,
        data_seed=tp.SEED, use_cpu=True, save_strategy="no", logging_steps=1,
        **({"packing": True, "max_length": 48} if packing else {}),
    )
    cls = AllPositionsTrainer if over_all_positions else SFTTrainer
    pad_is_eos = bug == "pad_ids_masked"
    collated = bug in ("pad_ids_masked", "labels_are_input_ids")
    extra = {"data_collator": collator(tp.EOS if pad_is_eos else tp.PAD, bug)} if collated else {}
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(hf_dir), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tp.tokenizer(pad_is_eos),
        **extra,
    )
    if bug == "no_loss_kwargs":
        # A model whose forward takes no num_items_in_batch: the trainer divides each
        # micro-batch's own mean by the accumulation.
        trainer.model_accepts_loss_kwargs = False
    if path is not None:
        maskaudit.capture(trainer, path, steps=STEPS)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _all_positions_trainer():
    import torch.nn.functional as F
    from trl import SFTTrainer

    class AllPositionsTrainer(SFTTrainer):
        """The founding bug in a trainer: F.cross_entropy's default mean over every position,
        prompts and padding included, against the next input id."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"],
                           attention_mask=inputs["attention_mask"]).logits
            v = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, v),
                                   inputs["input_ids"][:, 1:].reshape(-1))
            return (loss, None) if return_outputs else loss

    return AllPositionsTrainer


AllPositionsTrainer = None


def plain_loop(hf_dir: Path, path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import maskaudit

    torch.manual_seed(tp.SEED)
    rng = np.random.default_rng(tp.SEED)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    hook = maskaudit.capture_forward(model, path, steps=STEPS, accumulation=ACCUM) if path else None
    losses = []
    for step in range(STEPS + 1):
        for _ in range(ACCUM):
            lens = [int(n) for n in rng.integers(3, 12, size=BATCH)]
            width = max(lens)
            ids = torch.zeros(BATCH, width, dtype=torch.long)
            att = torch.zeros(BATCH, width, dtype=torch.long)
            for r, n in enumerate(lens):
                ids[r, :n] = torch.from_numpy(rng.integers(3, tp.VOCAB, size=n))
                att[r, :n] = 1
            labels = ids.masked_fill(att == 0, -100)
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            (loss / ACCUM).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    if hook is not None:
        hook.close()
    return losses


def expected(path: Path, per_micro_batch_mean: bool, hf_dir: Path) -> dict:
    """The trainer's numbers from the capture, and the truth: the eager model in float64 on
    the captured micro-batches (trl's fused LM head is off by about 2e-5 in float32)."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).double().eval()
    d = pq.read_table(path).to_pydict()
    keys = list(zip(d["maskaudit_step"], d["maskaudit_micro_batch"]))
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    total, exact, trained = 0.0, 0.0, 0
    for rows in groups.values():
        # Padded rows have an attention mask; padding-free ones position ids restarting at 0,
        # which keep their documents apart (with use_cache=False, as in training).
        batch = {k: torch.tensor([d[k][i] for i in rows])
                 for k in ("input_ids", "attention_mask", "position_ids", "labels")
                 if k in d and d[k][rows[0]] is not None}
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = d["maskaudit_trainer_loss"][rows[0]]
        norm = n if per_micro_batch_mean else d["maskaudit_num_items_in_batch"][rows[0]]
        total += loss * norm
        trained += n
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs, use_cache=False).logits
        exact += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 batch["labels"][:, 1:].reshape(-1), reduction="sum").item()
    return {"batch_size": BATCH, "micro_batches": len(groups), "trained": trained,
            "trainer_token_mean": total / trained, "token_mean": exact / trained}


def count_before_shift(source: Path, case: Path) -> None:
    """The SFT capture as a trainer that counts labels before the shift would have written it
    (one extra token per row: transformers PR 46204): num_items_in_batch + the step's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    d = table.to_pydict()
    rows_in_step = {}
    for step in d["maskaudit_step"]:
        rows_in_step[step] = rows_in_step.get(step, 0) + 1
    wrong = [n + rows_in_step[s] for n, s in zip(d["maskaudit_num_items_in_batch"],
                                                 d["maskaudit_step"])]
    column = table.schema.get_field_index("maskaudit_num_items_in_batch")
    table = table.set_column(column, "maskaudit_num_items_in_batch", pa.array(wrong, pa.float64()))
    case.mkdir(exist_ok=True)
    pq.write_table(table, case / "run.parquet")


def broken_captures(source: Path, out: Path) -> None:
    """Captures that are not what they claim: settings that are not JSON, and a capture
    without its maskaudit_step column (check must say so on one line, exit 2)."""
    import pyarrow.parquet as pq

    out.mkdir(exist_ok=True)
    table = pq.read_table(source)
    bad_json = table.replace_schema_metadata({b"maskaudit.capture": b"{not json"})
    pq.write_table(bad_json, out / "bad_settings.parquet")
    no_step = table.drop_columns(["maskaudit_step"])
    pq.write_table(no_step, out / "no_step.parquet")


def trace_losses(capture: Path, out: Path) -> None:
    """transformers' ForCausalLMLoss through maskaudit.trace_loss, as a trainer calls it (mean,
    and normalised by num_items_in_batch); and a loss that branches on the batch's shape in
    Python, which trace_loss must refuse."""
    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss

    import maskaudit

    out.mkdir(exist_ok=True)
    maskaudit.trace_loss(ForCausalLMLoss, out / "for_causal_lm.pt", args=("logits", "labels"),
                         vocab_size=tp.VOCAB, capture=str(capture))
    maskaudit.trace_loss(ForCausalLMLoss, out / "for_causal_lm_num_items.pt",
                         args=("logits", "labels", "num_items_in_batch"), vocab_size=tp.VOCAB,
                         capture=str(capture))

    def branchy(logits, labels):
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1))
        return loss * (2.0 if logits.shape[0] > 3 else 1.0)

    try:
        maskaudit.trace_loss(branchy, out / "branchy.pt", vocab_size=tp.VOCAB)
    except ValueError as e:
        assert "another shape" in str(e), e
    else:
        raise SystemExit("trace_loss accepted a loss that branches on the shape in Python")
    assert not (out / "branchy.pt").exists()
    print("ok   trace_loss: ForCausalLMLoss traced both ways; a shape-dependent loss refused")


def main(argv) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else (
        ROOT / "target" / "hf-models" / "capture")
    stamp = out / ".stamp"
    if stamp.is_file() and stamp.read_text() == stamp_text():
        print(f"captures up to date in {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir = tp.model_dir(tmp)
        tp.export(hf_dir, out / "model.pt")
        global AllPositionsTrainer
        AllPositionsTrainer = _all_positions_trainer()
        for name, run, per_mb in [
            ("sft_accumulation", lambda p: sft(hf_dir, tmp, p), False),
            ("plain_loop", lambda p: plain_loop(hf_dir, p), True),
            ("sft_over_all_positions", lambda p: sft(hf_dir, tmp, p, True), True),
            ("sft_eos_masked", lambda p: sft(hf_dir, tmp, p, bug="pad_ids_masked"), False),
            ("sft_padding_trained", lambda p: sft(hf_dir, tmp, p, bug="labels_are_input_ids"),
             False),
            ("sft_no_loss_kwargs", lambda p: sft(hf_dir, tmp, p, bug="no_loss_kwargs"), True),
            ("sft_packing", lambda p: sft(hf_dir, tmp, p, packing=True), False),
        ]:
            case = out / name
            case.mkdir(exist_ok=True)
            plain = run(None)
            captured = run(case / "run.parquet")
            if plain != captured:
                raise SystemExit(f"{name}: the capture changed training: {plain} vs {captured}")
            (case / "expected.json").write_text(
                json.dumps(expected(case / "run.parquet", per_mb, hf_dir), indent=2) + "\n")
            print(f"ok   {name}: losses identical with and without the capture")
        count_before_shift(out / "sft_accumulation" / "run.parquet", out / "count_before_shift")
        trace_losses(out / "sft_accumulation" / "run.parquet", out / "losses")
        broken_captures(out / "sft_accumulation" / "run.parquet", out / "broken")
    stamp.write_text(stamp_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
