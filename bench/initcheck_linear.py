#!/usr/bin/env python3
"""One float32 linear layer on CUDA, for compute-sanitizer: does libtorch's matrix product read
bytes nobody wrote? Every input is fully written (randn); run it under
`compute-sanitizer --tool initcheck` with TF32 on and off (docs/performance.md, "initcheck").

    initcheck_linear.py [--tf32 on|off] [--dtype float32|bfloat16] [--rows 156] [--k 64] [--n 384]
"""

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tf32", default="off")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", type=int, default=156)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--n", type=int, default=384)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.k, device="cuda", dtype=dtype)
    w = torch.randn(args.n, args.k, device="cuda", dtype=dtype)
    b = torch.randn(args.n, device="cuda", dtype=dtype)
    with torch.inference_mode():
        y = F.linear(x, w, b)
        z = y.float().sum()
    ref = (x.double() @ w.double().T + b.double()).sum()
    torch.cuda.synchronize()
    print(f"linear {args.rows}x{args.k} @ {args.k}x{args.n} {args.dtype} tf32 {args.tf32}: "
          f"sum {z.item():.4f} (float64 {ref.item():.4f})")


if __name__ == "__main__":
    main()
