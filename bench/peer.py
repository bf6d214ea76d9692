#!/usr/bin/env python3
"""The peer: the short PyTorch script a user would write instead of running maskaudit.

Same job and same rules as `maskaudit check`: rows in file order, batches of --batch-size
right-padded with --pad-id (padding gets mask 0), a row's mask from loss_mask, else
labels != -100, else attention_mask, else every token; next-token cross-entropy with
reduction='none'; the five aggregates in float64. Prints them as JSON.

    peer.py MODEL DATA --batch-size 8 --pad-id 0 [--device cpu|cuda] [--dtype bfloat16] [--tf32 on]

--dtype converts the model (`model.to(dtype)`, as a user would for bf16 inference; default: as
saved) and --tf32 on sets `torch.backends.cuda.matmul.allow_tf32` (PyTorch's default is off);
the logits are upcast with `.float()` before the cross-entropy either way.
"""

import time

STARTED = time.perf_counter()  # before `import torch`, so the harness can tell import from work

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def row_mask(row):
    if row.get("loss_mask") is not None:
        return row["loss_mask"]
    if row.get("labels") is not None:
        return [int(label != -100) for label in row["labels"]]
    if row.get("attention_mask") is not None:
        return row["attention_mask"]
    return [1] * len(row["input_ids"])


def batches(path, batch_size):
    batch = []
    with open(path) as f:
        for line in f:
            if line.strip():
                batch.append(json.loads(line))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def pad(rows, width, value):
    return [row + [value] * (width - len(row)) for row in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pad-id", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tf32", default="off")
    args = ap.parse_args()
    imported = time.perf_counter()
    device = torch.device(args.device)

    model = torch.jit.load(args.model, map_location=device).eval()
    if args.dtype != "auto":
        model = model.to(getattr(torch, args.dtype))
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    takes_mask = len(model.forward.schema.arguments) == 3  # self, input_ids, attention_mask

    rows = positions = 0
    trained = total = masked = row_means = batch_means = 0.0
    rows_trained = batches_trained = 0
    with torch.inference_mode():
        for batch in batches(args.data, args.batch_size):
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.tensor(pad([r["input_ids"] for r in batch], width, args.pad_id))
            attention = [r.get("attention_mask") or [1] * len(r["input_ids"]) for r in batch]
            mask = torch.tensor(pad([row_mask(r) for r in batch], width, 0))
            ids = ids.to(device)
            if takes_mask:
                out = model(ids, torch.tensor(pad(attention, width, 0)).to(device))
            else:
                out = model(ids)
            if isinstance(out, (tuple, list)):
                out = out[0]
            elif isinstance(out, dict):
                out = out["logits"]
            logits = out.float()
            b, t, v = logits.shape
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none"
            ).view(b, t - 1)
            loss = loss.double()
            m = mask[:, 1:].to(device, torch.float64)
            row_sum, row_count = (loss * m).sum(dim=1), m.sum(dim=1)
            # One transfer to the host per batch.
            sums = torch.stack([loss.sum(), row_sum.sum(), row_count.sum()]).tolist()
            per_row = torch.stack([row_sum, row_count]).tolist()
            total += sums[0]
            masked += sums[1]
            trained += sums[2]
            positions += b * (t - 1)
            rows += b
            for s, c in zip(*per_row):
                if c > 0:
                    row_means += s / c
                    rows_trained += 1
            if sums[2] > 0:
                batch_means += sums[1] / sums[2]
                batches_trained += 1

    print(
        json.dumps(
            {
                "rows": rows,
                "positions": positions,
                "supervised_positions": int(trained),
                "import_s": imported - STARTED,
                "run_s": time.perf_counter() - imported,
                "threads": torch.get_num_threads(),
                "losses": {
                    "masked_token_mean": masked / trained,
                    "all_positions_mean": total / positions,
                    "masked_sum_over_all_positions": masked / positions,
                    "sequence_mean": row_means / rows_trained,
                    "batch_mean_of_means": batch_means / batches_trained,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
