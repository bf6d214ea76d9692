"""Runs inside the venv the wheel is installed in (`make test-wheel`, tests/wheel/check_wheel.py),
with the wheel's `train` extra: a tiny random Llama as a user would have it, and a two-step
`transformers.Trainer` run recorded by `maskaudit.capture`.

    tiny_run.py model DIR      DIR/hf (save_pretrained) and DIR/data.jsonl
    tiny_run.py train DIR      trains DIR/hf for two optimizer steps, capturing the first:
                               DIR/run.parquet
"""

import json
import sys
from pathlib import Path

import torch

PAD, VOCAB, SEED = 0, 96, 0


def rows(n: int):
    g = torch.Generator().manual_seed(SEED)
    lengths = torch.randint(3, 24, (n,), generator=g)
    return [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def model(out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(out / "hf")
    with open(out / "data.jsonl", "w") as f:
        for ids in rows(10):
            f.write(json.dumps({"input_ids": ids}) + "\n")


# Like tests/export/capture_runs.py's collator, not imported from there: that module puts the
# checkout's python/ first on sys.path, and this run must use the installed package.
def collate(examples):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for r, e in enumerate(examples):
        ids[r, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention[r, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": attention,
            "labels": ids.masked_fill(attention == 0, -100)}


def train(out: Path):
    import trl  # noqa: F401  (the extra installs it: it must import)
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import maskaudit

    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, seed=SEED, remove_unused_columns=False,
    )
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(out / "hf"), args=args,
                      train_dataset=[{"input_ids": ids} for ids in rows(16)],
                      data_collator=collate)
    maskaudit.capture(trainer, str(out / "run.parquet"), steps=1)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2, f"expected two logged steps, got {steps}"


if __name__ == "__main__":
    {"model": model, "train": train}[sys.argv[1]](Path(sys.argv[2]))
