#!/usr/bin/env python3
"""Generates maskaudit's benchmark workloads: GPT-shaped TorchScript models and JSONL datasets.

Needs only PyTorch and the standard library, so it runs with the set-up's venv here and with the
plain `python3` of a GPU machine. Seeded: a rerun writes the same weights and rows.

    gen.py model OUT.pt --vocab 32000 --width 256 --layers 4 --heads 4 --max-pos 128
    gen.py model OUT.pt --arch qwen2 --vocab 151936 --width 896 --layers 24 --heads 14 \
        --kv-heads 2 --ffn 4864 --max-pos 32768 --dtype bfloat16
    gen.py data OUT.jsonl --rows 100 --min-len 16 --max-len 128 --vocab 32000 [--seed 1]

Models are GPT-2 shaped (learned positions, pre-norm blocks, causal attention, GELU MLP, final
LayerNorm, head tied to the token embedding) with random N(0, 0.02) weights; `forward(input_ids)`
returns logits [B, T, V]. `--arch qwen2` makes a Qwen2/Llama-shaped one instead: RMSNorm, rotary
positions (theta 1e6), grouped-query attention with biased q/k/v, SwiGLU MLP, head tied to the
embedding (Qwen2-0.5B's shape with the arguments above: 494M parameters). `--dtype` saves the
weights in that dtype (norms and rotary tables are computed in float32 inside, as Hugging Face's
Qwen2 does). A sidecar OUT.pt.json records the parameter count. Dataset rows are SFT-shaped:
`input_ids`, `labels` with the prompt part set to -100, and a `text` field that readers must skip.

`--arch qwen2-hf` builds the model a user would bring instead: transformers'
Qwen2ForCausalLM with that shape (random init, seed 0), saved with save_pretrained in --dtype to
a temporary directory, then exported by tools/maskaudit-export.py with `--device` (default
cuda when there is one), so maskaudit, the peer and
the floor run what the exporter writes: `forward(input_ids, attention_mask)`, eager attention.
This one needs transformers.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Gpt(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_pos: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(max_pos, width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos).unsqueeze(0)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


class RmsNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class QwenBlock(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.ln1 = RmsNorm(width)
        self.q = nn.Linear(width, heads * self.head_dim)
        self.k = nn.Linear(width, kv_heads * self.head_dim)
        self.v = nn.Linear(width, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, width, bias=False)
        self.ln2 = RmsNorm(width)
        self.gate = nn.Linear(width, ffn, bias=False)
        self.up = nn.Linear(width, ffn, bias=False)
        self.down = nn.Linear(ffn, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Qwen2(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.head_dim = width // heads
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([QwenBlock(width, heads, kv_heads, ffn)
                                     for _ in range(layers)])
        self.norm = RmsNorm(width)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        x = self.embed(input_ids)
        # Rotary tables in float32, from positions 0..t-1 (right padding keeps them right).
        inv = 1.0 / (1e6 ** (torch.arange(0, self.head_dim, 2, device=x.device,
                                          dtype=torch.float32) / self.head_dim))
        angles = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return F.linear(self.norm(x), self.embed.weight)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_model(path: Path, vocab: int, width: int, layers: int, heads: int, max_pos: int,
               arch: str = "gpt", kv_heads: int = 0, ffn: int = 0,
               dtype: str = "float32") -> None:
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2(vocab, width, layers, heads, kv_heads or heads, ffn or 4 * width)
    else:
        model = Gpt(vocab, width, layers, heads, max_pos)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    model = model.to(DTYPES[dtype])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model.eval()).save(str(path))
    Path(str(path) + ".json").write_text(json.dumps({"params": params, "arch": arch,
                                                      "dtype": dtype}))
    print(f"{path}: {arch}, {params / 1e6:.1f}M parameters, vocabulary {vocab}, "
          f"{layers}x{width}, {dtype}")


def export_model(path: Path, vocab: int, width: int, layers: int, heads: int, max_pos: int,
                 kv_heads: int, ffn: int, dtype: str, device: str) -> None:
    import subprocess
    import sys
    import tempfile

    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=ffn or 4 * width,
        max_position_embeddings=max_pos, tie_word_embeddings=True, rope_theta=1e6,
        rms_norm_eps=1e-6)
    model = transformers.Qwen2ForCausalLM(config).to(DTYPES[dtype])
    params = sum(p.numel() for p in model.parameters())
    exporter = Path(__file__).resolve().parents[1] / "python" / "maskaudit" / "export.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="maskaudit-gen-") as tmp:
        model.save_pretrained(tmp)
        del model
        subprocess.run([sys.executable, str(exporter), tmp, str(path), "--dtype", dtype,
                        "--device", device, "--max-verify-length", "2048"], check=True)
    Path(str(path) + ".json").write_text(json.dumps({"params": params, "arch": "qwen2-hf",
                                                      "dtype": dtype}))
    print(f"{path}: Qwen2ForCausalLM through the exporter on {device}, {params / 1e6:.1f}M "
          f"parameters, vocabulary {vocab}, {layers}x{width}, {dtype}")


def make_data(path: Path, rows: int, min_len: int, max_len: int, vocab: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = 0
    with path.open("w") as f:
        for i in range(rows):
            n = rng.randint(min_len, max_len)
            ids = [rng.randrange(1, vocab) for _ in range(n)]
            prompt = rng.randint(1, n // 2)
            labels = [-100] * prompt + ids[prompt:]
            row = {"id": i, "text": f"row {i}", "input_ids": ids, "labels": labels}
            f.write(json.dumps(row) + "\n")
            tokens += n
    print(f"{path}: {rows} rows, {tokens} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model")
    m.add_argument("out", type=Path)
    m.add_argument("--vocab", type=int, required=True)
    m.add_argument("--width", type=int, required=True)
    m.add_argument("--layers", type=int, required=True)
    m.add_argument("--heads", type=int, required=True)
    m.add_argument("--max-pos", type=int, required=True)
    m.add_argument("--arch", choices=("gpt", "qwen2", "qwen2-hf"), default="gpt")
    m.add_argument("--kv-heads", type=int, default=0)
    m.add_argument("--ffn", type=int, default=0)
    m.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    m.add_argument("--device", help="where qwen2-hf is traced (default: cuda when available)")
    d = sub.add_parser("data")
    d.add_argument("out", type=Path)
    d.add_argument("--rows", type=int, required=True)
    d.add_argument("--min-len", type=int, required=True)
    d.add_argument("--max-len", type=int, required=True)
    d.add_argument("--vocab", type=int, required=True)
    d.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    start = time.perf_counter()
    if args.what == "model" and args.arch == "qwen2-hf":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        export_model(args.out, args.vocab, args.width, args.layers, args.heads, args.max_pos,
                     args.kv_heads, args.ffn, args.dtype, device)
    elif args.what == "model":
        make_model(args.out, args.vocab, args.width, args.layers, args.heads, args.max_pos,
                   args.arch, args.kv_heads, args.ffn, args.dtype)
    else:
        make_data(args.out, args.rows, args.min_len, args.max_len, args.vocab, args.seed)
    print(f"  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
