#!/usr/bin/env python3
"""The transformers script that bench/hf_speed.py races: what an ML engineer writes by hand.

    hf_script.py MODEL_DIR DATA.jsonl --batch-size 8 [--attention sdpa|eager]

Loads the saved Hugging Face model in bfloat16 on the GPU with the given attention, reads the
JSONL rows in order, runs them in batches (right-padded to the batch's longest row, with an
attention mask; packed rows with their `position_ids` and no mask), and takes the next-token
cross-entropy per token (reduction 'none', float32 logits, one row at a time so the float32
copy of a 152k-vocabulary batch does not dominate memory), summed over the labelled tokens.
Prints one JSON line: the loop's seconds (first batch to the last result on the host), tokens,
the masked token mean.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
import transformers


def batches(path, size):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == size:
                yield rows
                rows = []
    if rows:
        yield rows


def tensors(rows, device):
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    packed = "position_ids" in rows[0]
    pos = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
        if packed:
            pos[i, :n] = torch.tensor(r["position_ids"])
    kw = {"input_ids": ids.to(device, non_blocking=True)}
    if packed:
        # Padding-free: transformers keeps documents apart from the restarting position ids.
        kw["position_ids"] = pos.to(device, non_blocking=True)
    else:
        kw["attention_mask"] = mask.to(device, non_blocking=True)
    return kw, labels.to(device, non_blocking=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--attention", default="sdpa")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16, attn_implementation=args.attention)
    model = model.to("cuda").eval()
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    count = torch.zeros((), dtype=torch.long, device="cuda")
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for rows in batches(args.data, args.batch_size):
            kw, labels = tensors(rows, "cuda")
            tokens += sum(len(r["input_ids"]) for r in rows)
            logits = model(**kw, use_cache=False).logits
            target = labels[:, 1:]
            for i in range(logits.shape[0]):
                ce = F.cross_entropy(logits[i, :-1].float(), target[i], reduction="none",
                                     ignore_index=-100)
                total += ce.double().sum()
            count += (target != -100).sum()
    count = int(count)
    mean = total.item() / count
    loop = time.perf_counter() - start
    print(json.dumps({"loop_s": loop, "tokens": tokens, "trained": count,
                      "masked_token_mean": mean, "attention": args.attention}))


if __name__ == "__main__":
    main()
