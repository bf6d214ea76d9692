#!/usr/bin/env python3
"""`maskaudit.capture` on every rank of a 2-process run (run by `make hf-models`, read by
tests/capture_ranks.rs).

    capture_ranks.py [--out DIR]        (default target/hf-models/capture_ranks)

One `torchrun --nproc_per_node 2` launch, on the CPU with the gloo backend, trains the tiny
Llama of tests/export/trl_pipelines.py (exported to DIR/model.pt) for one optimizer step of
two micro-batches a rank in each case, capturing it with per-token losses:

    sft_global      trl SFTTrainer, average_tokens_across_devices=True: the global token mean
    trainer_per_rank  transformers Trainer, average_tokens_across_devices=False, with a collator
                    that trains only each row's last two tokens on rank 0 and every token on
                    rank 1: each rank divides by its own count (per-rank mean, averaged)
    loop_world_size a hand-written DDP loop (maskaudit.capture_forward) that divides each
                    rank's loss by the global count, which DDP's averaging then divides by the
                    world size again

DIR/<case>/run.rank<r>.parquet are the captures; DIR/<case>/expected.json is the truth
recomputed in this one process over all ranks' captured micro-batches, with the eager model in
float64 and F.cross_entropy: {"world_size", "micro_batches", "trained", "token_mean",
"ranks": [{"trained", "token_mean"}], "max_token_loss_difference"} (the last: the recorded
per-token losses against that recomputation, at every position). DIR/broken/ holds bad
inputs for `--captured-losses` (a rank missing, two world sizes, no token losses) and
`not_the_model`, whose rank 1 recorded losses 1% above the model's. DIR/lm_head/ is a capture whose model returns no logits (the
LM head's hook gives them).

Skipped when DIR/.stamp matches this script, the capture module and the library versions.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "python"))

import trl_pipelines as tp  # noqa: E402

CAPTURE = ROOT / "python" / "maskaudit" / "capture.py"
CASES = ("sft_global", "trainer_per_rank", "loop_world_size")
BATCH, ACCUM, WORLD = 2, 2, 2


def stamp_text() -> str:
    h = hashlib.sha256()
    for path in (Path(__file__), CAPTURE, tp.EXPORTER):
        h.update(path.read_bytes())
    return h.hexdigest() + " " + tp.stamp_text()


def rows(seed: int, n: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"prompt": tp.words(rng, int(rng.integers(1, 8))),
             "completion": " " + tp.words(rng, int(rng.integers(4, 14)))} for _ in range(n)]


def id_rows(seed: int, n: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"input_ids": [int(t) for t in rng.integers(3, tp.VOCAB, size=int(rng.integers(6, 16)))]}
            for _ in range(n)]


def rank_collator(rank: int):
    """Padded rows whose labels train only the last two real tokens on rank 0 and every real
    token on rank 1: the ranks' counts differ about fivefold."""
    import torch

    def collate(examples):
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), tp.PAD, dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            attention[r, :n] = 1
            first = n - 2 if rank == 0 else 0
            labels[r, first:n] = ids[r, first:n]
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate


def worker(hf_dir: Path, out: Path) -> None:
    """One rank: the three cases in turn, each capturing its first optimizer step."""
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    import maskaudit

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    common = dict(per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                  max_steps=1, report_to=[], seed=tp.SEED, data_seed=tp.SEED, use_cpu=True,
                  save_strategy="no", logging_steps=1, ddp_backend="gloo")

    torch.manual_seed(tp.SEED)
    # bf16=False: trl's default autocast would make the recorded losses bf16's, not the
    # float32 recomputation's.
    args = SFTConfig(output_dir=str(out / "tmp" / "sft"), average_tokens_across_devices=True,
                     bf16=False, **common)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(hf_dir), args=args,
                         train_dataset=Dataset.from_list(rows(tp.SEED, 16)),
                         processing_class=tp.tokenizer(False))
    maskaudit.capture(trainer, out / "sft_global" / "run.parquet", steps=1)
    trainer.train()

    torch.manual_seed(tp.SEED)
    args = TrainingArguments(output_dir=str(out / "tmp" / "trainer"),
                             average_tokens_across_devices=False, remove_unused_columns=False,
                             **common)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(hf_dir), args=args,
                      train_dataset=Dataset.from_list(id_rows(tp.SEED, 16)),
                      data_collator=rank_collator(rank))
    maskaudit.capture(trainer, out / "trainer_per_rank" / "run.parquet", steps=1)
    trainer.train()

    loop(hf_dir, out / "loop_world_size" / "run.parquet", rank, world)
    dist.barrier()


def loop(hf_dir: Path, path: Path, rank: int, world: int) -> None:
    """A hand-written DDP loop: the step's count all-reduced over the ranks, each rank's loss
    divided by it, and DDP's gradient averaging dividing by the world size on top."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoModelForCausalLM

    import maskaudit

    torch.manual_seed(tp.SEED)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    model.train()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
    hook = maskaudit.capture_forward(model, path, steps=1, accumulation=ACCUM, rank=rank,
                                     world_size=world)
    collate = rank_collator(rank)
    data = id_rows(tp.SEED + 1 + rank, BATCH * ACCUM)
    batches = [collate(data[i:i + BATCH]) for i in range(0, len(data), BATCH)]
    count = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
    dist.all_reduce(count)
    for b in batches:
        loss = ddp(**b, num_items_in_batch=count).loss
        loss.backward()
    opt.step()
    hook.close()


def recompute(case: Path, hf_dir: Path) -> dict:
    """The truth in one process: every rank's captured micro-batches through the eager model in
    float64, F.cross_entropy against the next input id, masked by the shifted labels."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).double().eval()
    ranks, micro_batches, worst = [], 0, 0.0
    for rank in range(WORLD):
        d = pq.read_table(case / f"run.rank{rank}.parquet").to_pydict()
        groups = {}
        for i, k in enumerate(zip(d["maskaudit_step"], d["maskaudit_micro_batch"])):
            groups.setdefault(k, []).append(i)
        total, trained = 0.0, 0
        for members in groups.values():
            batch = {k: torch.tensor([d[k][i] for i in members])
                     for k in ("input_ids", "attention_mask", "labels")}
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"], use_cache=False).logits
            v = logits.shape[-1]
            every = F.cross_entropy(logits[:, :-1].reshape(-1, v),
                                    batch["input_ids"][:, 1:].reshape(-1), reduction="none")
            recorded = torch.tensor([d["maskaudit_token_losses"][i] for i in members],
                                    dtype=torch.float64).reshape(-1)
            worst = max(worst, float((recorded - every).abs().max()))
            mask = batch["labels"][:, 1:].reshape(-1) != -100
            total += float(every[mask].sum())
            trained += int(mask.sum())
        ranks.append({"trained": trained, "token_mean": total / trained})
        micro_batches += len(groups)
    trained = sum(r["trained"] for r in ranks)
    total = sum(r["token_mean"] * r["trained"] for r in ranks)
    return {"world_size": WORLD, "micro_batches": micro_batches, "trained": trained,
            "token_mean": total / trained, "ranks": ranks, "max_token_loss_difference": worst}


def broken(source: Path, out: Path) -> None:
    """Bad input for --captured-losses: a rank missing, two world sizes, no token losses."""
    import pyarrow.parquet as pq

    if out.exists():
        shutil.rmtree(out)
    missing = out / "missing_rank"
    missing.mkdir(parents=True)
    shutil.copy(source / "run.rank0.parquet", missing / "run.rank0.parquet")
    worlds = out / "world_sizes"
    worlds.mkdir()
    shutil.copy(source / "run.rank0.parquet", worlds / "run.rank0.parquet")
    table = pq.read_table(source / "run.rank1.parquet")
    meta = json.loads(table.schema.metadata[b"maskaudit.capture"])
    meta["world_size"] = 3
    pq.write_table(table.replace_schema_metadata({b"maskaudit.capture": json.dumps(meta)}),
                   worlds / "run.rank1.parquet")
    no_losses = out / "no_token_losses"
    no_losses.mkdir()
    shutil.copy(source / "run.rank0.parquet", no_losses / "run.rank0.parquet")
    pq.write_table(table.drop_columns(["maskaudit_token_losses"]), no_losses / "run.rank1.parquet")
    # Recorded losses that are not the model's: rank 1's, 1% higher.
    import pyarrow as pa

    off = out / "not_the_model"
    off.mkdir()
    shutil.copy(source / "run.rank0.parquet", off / "run.rank0.parquet")
    column = table.schema.get_field_index("maskaudit_token_losses")
    higher = [[x * 1.01 for x in row] for row in table.column(column).to_pylist()]
    pq.write_table(table.set_column(column, "maskaudit_token_losses",
                                    pa.array(higher, pa.list_(pa.float32()))),
                   off / "run.rank1.parquet")


def lm_head_source(hf_dir: Path, out: Path) -> None:
    """A model whose output carries no logits (as under a chunked loss): the capture takes
    them from the LM head's hook, and they equal the output's own."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    import maskaudit

    class NoLogits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            output = self.inner(**kwargs)
            return {"loss": output.loss}

    torch.manual_seed(tp.SEED)
    inner = AutoModelForCausalLM.from_pretrained(hf_dir)
    model = NoLogits(inner).train()
    ids = torch.randint(3, tp.VOCAB, (2, 9))
    truths = []
    for path, m in ((out / "lm_head.parquet", model), (out / "logits.parquet", inner)):
        hook = maskaudit.capture_forward(m, path, steps=1)
        m(input_ids=ids, labels=ids)
        hook.close()
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"maskaudit.capture"])
        truths.append((meta["token_losses"], table.column("maskaudit_token_losses").to_pylist()))
    (head, a), (logits, b) = truths
    if (head, logits) != ("lm_head", "logits") or a != b:
        raise SystemExit(f"lm_head source: {head} vs {logits}, losses equal: {a == b}")
    print("ok   lm_head: a model without output logits is captured from its LM head, identically")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv) -> int:
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]), Path(argv[2]))
        return 0
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else (
        ROOT / "target" / "hf-models" / "capture_ranks")
    stamp = out / ".stamp"
    if stamp.is_file() and stamp.read_text() == stamp_text():
        print(f"multi-rank captures up to date in {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir = tp.model_dir(tmp)
        tp.export(hf_dir, out / "model.pt")
        torchrun = Path(sys.executable).with_name("torchrun")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "python"))
        subprocess.run([str(torchrun), "--nproc_per_node", str(WORLD), "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker",
                        str(hf_dir), str(out)], check=True, env=env)
        shutil.rmtree(out / "tmp", ignore_errors=True)
        for name in CASES:
            truth = recompute(out / name, hf_dir)
            if truth["max_token_loss_difference"] > 1e-4:
                raise SystemExit(f"{name}: recorded token losses off by "
                                 f"{truth['max_token_loss_difference']}")
            (out / name / "expected.json").write_text(json.dumps(truth, indent=2) + "\n")
            print(f"ok   {name}: {truth['ranks']}")
        broken(out / "trainer_per_rank", out / "broken")
        (out / "lm_head").mkdir(exist_ok=True)
        lm_head_source(hf_dir, out / "lm_head")
    stamp.write_text(stamp_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
