#!/usr/bin/env python3
"""What per-token losses cost a captured step (docs/guide.md, "Auditing a multi-GPU run").

    capture_overhead.py [--vocab V ...] [--steps N] [--rows B] [--length T]

A tiny random Llama (2 layers, hidden 32, as tests/export/trl_pipelines.py's, with vocabulary V)
trains N steps of one micro-batch [B, T] on the CPU, forward and backward, three ways: no
capture, `capture_forward(token_losses=False)`, `capture_forward(token_losses=True)`. Prints the
fastest step of each (the modes interleaved, so that other load falls on all alike), and the
token losses' share of a captured step; and the token losses' computation alone on the same
logits (the fastest of N), which other load disturbs less than a difference of two steps.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def setup(vocab: int, length: int, mode: str, steps: int, tmp: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import maskaudit

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(64, length))
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    hook = None
    if mode != "none":
        hook = maskaudit.capture_forward(model, tmp / f"{mode}.parquet", steps=steps + 1,
                                         token_losses=mode == "token_losses")
    return model, opt, hook


def step(model, opt, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - start


def measure(vocab: int, steps: int, rows: int, length: int, tmp: Path) -> dict:
    """The three modes' steps interleaved, so that load from other processes falls on all
    alike; the fastest step of each (the least disturbed)."""
    import torch

    modes = ("none", "capture", "token_losses")
    runs = {m: setup(vocab, length, m, steps, tmp) for m in modes}
    ids = torch.randint(3, vocab, (rows, length))
    times = {m: [] for m in modes}
    for _ in range(steps):
        for m in modes:
            model, opt, _ = runs[m]
            times[m].append(step(model, opt, ids))
    for _, _, hook in runs.values():
        if hook is not None:
            hook.close()
    out = {m: min(t[1:]) for m, t in times.items()}
    # The hooks' own work alone, on the same logits: less exposed to other load than the
    # difference of two steps.
    import importlib

    capture = importlib.import_module("maskaudit.capture")
    model = runs["none"][0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    alone = []
    for _ in range(steps):
        start = time.perf_counter()
        capture._row_losses(ids, lambda r, s, e: logits[r, s:e], vocab, length)
        alone.append(time.perf_counter() - start)
    out["alone"] = min(alone)
    return out


def main(argv) -> int:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, nargs="+", default=[160, 32000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"micro-batch [{args.rows}, {args.length}], fastest of {args.steps - 1} steps")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            t = measure(vocab, args.steps, args.rows, args.length, Path(tmp))
            extra = t["token_losses"] - t["capture"]
            print(f"V={vocab:6d}: no capture {t['none'] * 1e3:8.2f} ms, capture "
                  f"{t['capture'] * 1e3:8.2f} ms, with token losses {t['token_losses'] * 1e3:8.2f}"
                  f" ms: token losses {extra * 1e3:+.2f} ms "
                  f"({extra / t['capture'] * 100:+.1f}% of a captured step); the token losses "
                  f"alone {t['alone'] * 1e3:.2f} ms ({t['alone'] / t['none'] * 100:.1f}% of a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
