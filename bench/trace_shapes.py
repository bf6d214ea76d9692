#!/usr/bin/env python3
"""What a new input shape costs the exporter's SDPA trace on a GPU (docs/performance.md, issue 22).

    trace_shapes.py [--dir /tmp/bench/hf-speed]

Needs the model and data `bench/hf_speed.py` leaves in --dir. Runs the trace (in this python's
libtorch, the JIT's profiling mode off as maskaudit runs it) over the 32 batches' shapes of
padded.jsonl (8 rows each, the batch's longest row), random ids: once at each batch's own
length, again over the same shapes, then with the lengths rounded up to multiples of 64, 128
and 256, at 32 new shorter lengths, and with cuDNN's attention off. libtorch builds a cuDNN
attention plan for each new shape; the first pass pays for it, the second does not.
"""
import argparse
import json
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench/hf-speed"))
    d = ap.parse_args().dir
    torch._C._jit_set_profiling_mode(False)
    with open(d / "padded.jsonl") as f:
        lens = [len(json.loads(line)["input_ids"]) for line in f]
    shapes = [max(lens[i:i + 8]) for i in range(0, len(lens), 8)]
    extra = {"maskaudit.json": ""}
    model = torch.jit.load(str(d / "sdpa.pt"), map_location="cuda", _extra_files=extra)
    args = json.loads(extra["maskaudit.json"])["forward_args"]

    def inputs(t):
        ids = torch.randint(1, 151936, (8, t), device="cuda")
        mask = torch.ones(8, t, dtype=torch.long, device="cuda")
        mask[:, t - 50:] = 0
        pos = torch.arange(t, device="cuda")[None].expand(8, t).contiguous()
        given = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        return [given[a] for a in args]

    def run(name, lengths):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for t in lengths:
                model(*inputs(t))
        torch.cuda.synchronize()
        print(f"{name}: {time.perf_counter() - start:.3f} s for {len(lengths)} batches "
              f"({len(set(lengths))} shapes)", flush=True)

    with torch.no_grad():
        model(*inputs(16))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    run("each batch's own length, first pass", shapes)
    run("each batch's own length, second pass", shapes)
    for q in (64, 128, 256):
        run(f"rounded up to a multiple of {q}, first pass", [-(-t // q) * q for t in shapes])
    run("lengths 1101..1132 (new)", list(range(1101, 1133)))
    torch.backends.cuda.enable_cudnn_sdp(False)
    run("cuDNN attention off, lengths 1201..1232 (new)", list(range(1201, 1233)))
    run("cuDNN attention off, each batch's own length", shapes)


if __name__ == "__main__":
    main()
