#!/usr/bin/env python3
"""maskaudit-export: a Hugging Face causal LM directory to a TorchScript file for maskaudit,
verified against the eager model.

    maskaudit-export MODEL_DIR model.pt [--dtype float32|bfloat16|float16] [--trace-length N]
                     [--tolerance X] [--max-verify-length N]
                     [--no-substitutes]

(`make export MODEL=dir OUT=model.pt [DTYPE=...]` runs it with the set-up's Python.)

MODEL_DIR is anything `AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)`
loads; the hub is never contacted. The model is loaded in eval mode, in the dtype asked, with
eager attention, and a wrapper whose `forward(input_ids, attention_mask)` returns the logits
tensor [B, T, V] is traced (`use_cache=False`, keyword arguments into the model) on a batch of
two rows, one right-padded, so the trace does not bake in the no-padding case. Modules that
trace into something TorchScript cannot save get a stand-in computing the same formula for the
trace only: Bloom's GeLU (an autograd.Function), rotary embeddings with dynamic NTK scaling
(whose frequencies transformers picks in Python per call); --no-substitutes turns that off.

Verification, printed one line per case: the saved archive is loaded back and run next to the
eager model on right-padded batches of 3 rows at lengths below, at and past the trace length,
past `sliding_window`, `original_max_position_embeddings` (scaled RoPE) and
`max_position_embeddings` where the config has them (up to --max-verify-length). A model whose
eager forward itself fails past its `max_position_embeddings` (learned position embeddings:
GPT-2, OPT) has that length recorded as its limit, not counted as a failure. A batch of 1 row
and an unpadded batch are checked too. The difference at one length is
max |traced - eager| / max |eager| over the logits at real (attention_mask = 1) positions.
Then causality: changing one token must leave the logits before it, and the other rows'
logits, exactly as they were (a bidirectional model fails here). A difference above the
tolerance (default 1e-4 for float32, 2e-2 for bfloat16 and float16) fails the export: one
line on stderr, exit status 1, no file written (the archive is written to a temporary file
beside OUT and renamed only when every check passed). In bfloat16 and float16, where eager and
SDPA attention (or a packed row and its documents alone) round apart past 2e-2 on a deep model
at a few thousand tokens, a difference past the default tolerance is asked again against the
float32 eager model (the same weights, upcast): the trace passes when it is at most twice as
far from it as the eager model itself (`low_precision_reference` in the record). An explicit
--tolerance is always a plain bound. Bad input (no model directory, no
config.json, not a causal LM) exits with 2.

The record: the archive holds `extra/maskaudit.json` (`torch.jit.save(..., _extra_files=...)`;
in the zip, `<archive name>/extra/maskaudit.json`), a JSON object:

    format_version           1
    forward_args             ["input_ids", "attention_mask"]  (the order forward takes them)
    output                   "logits": forward returns the logits tensor [B, T, V]
    architecture             config.architectures[0], else the model's class name
    model_type               config.model_type
    dtype                    "float32" | "bfloat16" | "float16": the weights' dtype
    logits_dtype             the same names: the dtype of the returned logits
    vocab_size               the logits' last dimension (may exceed config.vocab_size: padding)
    max_position_embeddings  int from the config, or null
    length_limit             int or null: the longest input the eager model itself accepts
                             (max_position_embeddings when the eager model fails past it), or
                             null when no limit was found
    sliding_window           int or null, from the config
    trace_length             the padded length of the example batch that was traced
    verified_lengths         the sequence lengths checked against eager, ascending
    max_relative_difference  the largest difference over every check (definition above)
    max_relative_difference_padding  the same at padding (attention_mask = 0) positions;
                             not checked against the tolerance (a note is printed above it)
    tolerance                the tolerance the checks passed
    low_precision_reference  null, or for a low-precision export whose checks went past the
                             tolerance: {rule, checks, worst_trace_vs_float32,
                             worst_eager_vs_float32}
    exporter                 "maskaudit-export 1"
    torch_version            torch.__version__ of the export
    transformers_version     transformers.__version__ of the export
    device                   where it was traced and verified ("cpu", "cuda", "cuda:0"; --device).
                             A trace keeps the device of the tensors the model creates (causal
                             mask, positions): a CPU trace of most models fails on a GPU, and
                             maskaudit says so, naming this key
"""

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

# Never the hub: set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

EXPORTER = "maskaudit-export 1"
FORMAT_VERSION = 1
RECORD_NAME = "maskaudit.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
# In bfloat16/float16 a check past the tolerance is asked again against the float32 model: the
# trace passes when it is no further from it than this many times the eager model's own error.
LOW_PRECISION_FACTOR = 2.0
SEED = 1234


class ExportError(Exception):
    """A failure reported as one line on stderr; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].strip()
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}"


class BloomGeluTraceable(nn.Module):
    """Bloom's GeLU without its torch.autograd.Function (which TorchScript cannot save): the
    same formula as transformers' bloom_gelu_forward, which that Function's forward calls."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def has_dynamic_rope(module: nn.Module) -> bool:
    rope_type = getattr(module, "rope_type", None)
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    plain = getattr(type(module).forward, "__wrapped__", None)
    return plain is not None and any(isinstance(t, str) and "dynamic" in t for t in types)


class DynamicRopeTraceable(nn.Module):
    """A rotary embedding with dynamic NTK scaling whose frequencies are computed, in tensor
    operations, from the length of each call. transformers picks them in Python (`if seq_len >
    max_seq_len_cached`) and keeps them in a buffer, so a trace would keep the traced length's
    frequencies at every length. This calls the same frequency function (it accepts a tensor
    length) and the module's own undecorated forward with them."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.plain_forward = type(inner).forward.__wrapped__

    def forward(self, x: Tensor, position_ids: Tensor, layer_type=None):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inner = self.inner
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        rope_type = inner.rope_type if layer_type is None else inner.rope_type[layer_type]
        if "dynamic" not in rope_type:
            return inner(x, position_ids, **kwargs)
        seq_len = torch.max(position_ids) + 1
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](
            inner.config, x.device, seq_len=seq_len, layer_type=layer_type
        )
        name = "inv_freq" if layer_type is None else f"{layer_type}_inv_freq"
        kept = getattr(inner, name)
        setattr(inner, name, inv_freq)
        try:
            return self.plain_forward(inner, x, position_ids, **kwargs)
        finally:
            setattr(inner, name, kept)


# Modules that trace into something TorchScript cannot save or into a wrong graph: (which, a
# stand-in computing the same thing). Swapped in for tracing only; verification runs the
# original model.
TRACEABLE_SUBSTITUTES = [
    (lambda m: type(m).__name__ == "BloomGelu", lambda m: BloomGeluTraceable()),
    (has_dynamic_rope, DynamicRopeTraceable),
]


@contextlib.contextmanager
def traceable_substitutes(model: nn.Module):
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            for which, stand_in in TRACEABLE_SUBSTITUTES:
                if which(child):
                    setattr(parent, name, stand_in(child))
                    swapped.append((parent, name, child))
                    break
    try:
        yield [type(child).__name__ for _, _, child in swapped]
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class LogitsOnly(nn.Module):
    """forward(input_ids, attention_mask) -> logits [B, T, V]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def document_mask(position_ids: Tensor, attention_mask: Optional[Tensor], dtype) -> Tensor:
    """The additive 4D mask [B, 1, T, T] keeping a packed row's documents apart: a query sees
    the keys at or before it in its own document (and, with an attention mask, not padding).
    A document starts wherever the position does not go up by one (transformers' own rule for
    padding-free batches, find_packed_sequence_indices). Built from tensors only, so a trace
    keeps it for every row."""
    first = position_ids[:, :1] - 1
    doc = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    index = torch.arange(position_ids.shape[1], device=position_ids.device)
    causal = index[None, :] <= index[:, None]
    allowed = causal[None] & (doc[:, :, None] == doc[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    # The dtype's minimum, not -inf: a query that sees nothing (left padding) stays finite.
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class PackedLogits(nn.Module):
    """forward(input_ids, attention_mask, position_ids) -> logits [B, T, V], documents apart."""

    def __init__(self, model: nn.Module, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        mask = document_mask(position_ids, attention_mask, self.dtype)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False)
        return out.logits


class PaddingFreeLogits(nn.Module):
    """forward(input_ids, position_ids) -> logits [B, T, V]: trl's padding-free rows."""

    def __init__(self, model: nn.Module, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        mask = document_mask(position_ids, None, self.dtype)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False)
        return out.logits


# --layout: the traced forward's arguments and the row layouts its record says it supports.
LAYOUTS = {
    "packed": (["input_ids", "attention_mask", "position_ids"], ["padded", "packed_position_ids"]),
    "padding-free": (["input_ids", "position_ids"], ["packed_position_ids"]),
    "padded": (["input_ids", "attention_mask"], ["padded"]),
}


@contextlib.contextmanager
def attention(model: nn.Module, implementation: str):
    """The model runs with this attention implementation inside the block."""
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(implementation)
    except Exception as exc:  # noqa: BLE001: a model without it falls back
        raise ExportError(f"no {implementation} attention: {first_line(exc, 120)}")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def load_model(model_dir: Path, dtype: torch.dtype):
    if not model_dir.exists():
        raise ExportError(f"{model_dir}: no such directory", 2)
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: not a directory (give a Hugging Face model directory)", 2)
    if not (model_dir / "config.json").is_file():
        raise ExportError(
            f"{model_dir}: not a Hugging Face model directory (no config.json)", 2
        )
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001: every failure becomes one line
        hint = ""
        try:
            if "auto_map" in json.loads((model_dir / "config.json").read_text()):
                hint = " (a model with its own code, auto_map: not run; trust_remote_code is off)"
        except (OSError, ValueError):
            pass
        raise ExportError(
            f"{model_dir}/config.json: cannot read it{hint}: {first_line(exc)}", 2
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype, attn_implementation="eager"
        )
    except ValueError as exc:
        if "AutoModelForCausalLM" in str(exc) or "Unrecognized configuration" in str(exc):
            raise ExportError(
                f"{model_dir}: not a causal language model "
                f"(model_type {getattr(config, 'model_type', None)!r}): {first_line(exc)}",
                2,
            )
        raise ExportError(f"{model_dir}: cannot load the model: {first_line(exc)}", 2)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{model_dir}: cannot load the model: {first_line(exc)}", 2)
    model.eval()
    model.requires_grad_(False)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return config, model


def config_int(config, name: str) -> Optional[int]:
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def original_max_positions(config) -> Optional[int]:
    """The pre-training length of a RoPE scaled past it (longrope, yarn, llama3), if given."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    candidates = [config_int(config, "original_max_position_embeddings")]
    if isinstance(rope, dict):
        value = rope.get("original_max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            candidates.append(value)
    found = [c for c in candidates if c is not None]
    return min(found) if found else None


def make_batch(lengths: List[int], vocab: int, gen: torch.Generator):
    """Right-padded rows of the given lengths; pad id 0, token ids in [1, vocab)."""
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask.eq(0), 0), mask


def padded_rows(length: int) -> List[int]:
    return [length, max(1, (2 * length) // 3), max(1, length // 4)]


def relative_difference(eager: Tensor, traced: Tensor, mask: Tensor) -> float:
    real = mask.bool()
    e = eager.float()[real]
    t = traced.float()[real]
    if not torch.isfinite(t).all():
        return float("inf")
    scale = e.abs().max().clamp_min(1e-12)
    return float((t - e).abs().max() / scale)


class NotCheckedOnCpu(Exception):
    """Exporter.eager_on_cpu could not tell whether the eager model fails past its limit."""


class Exporter:
    def __init__(self, args):
        self.args = args
        self.dtype_name = args.dtype
        self.dtype = DTYPES[args.dtype]
        self.tolerance = (
            args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
        )
        self.gen = torch.Generator().manual_seed(SEED)
        # The float32 eager model, made on first need (low precision only); False: it does
        # not fit.
        self.reference_wrapper = None
        # What `passes` found past the tolerance, for the line of the check that asked.
        self.notes: List[str] = []
        self.low_precision = {"checks": 0, "worst_trace": 0.0, "worst_eager": 0.0}
        try:
            self.device = torch.device(args.device)
        except RuntimeError as exc:
            raise ExportError(f"--device {args.device}: {first_line(exc)}", 2)

    def batch(self, lengths: List[int], vocab: int):
        """make_batch's rows, on the device the model is traced on."""
        ids, mask = make_batch(lengths, vocab, self.gen)
        return ids.to(self.device), mask.to(self.device)

    def say(self, line: str) -> None:
        print(line, flush=True)

    def run(self) -> None:
        args = self.args
        model_dir = Path(args.model_dir)
        out = Path(args.out)
        if args.trace_length < 4:
            raise ExportError("--trace-length must be at least 4", 2)
        if not out.parent.is_dir():
            raise ExportError(f"{out}: its directory does not exist", 2)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ExportError(f"--device {args.device}: PyTorch sees no CUDA device here", 2)

        import transformers

        config, model = load_model(model_dir, self.dtype)
        model.to(self.device)
        self.config = config
        architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        model_type = getattr(config, "model_type", None)
        vocab = config_int(config, "vocab_size") or 2
        max_pos = config_int(config, "max_position_embeddings")
        window = config_int(config, "sliding_window")
        # The reference every check compares with: the eager model, documents run alone.
        self.wrapper = LogitsOnly(model).eval()
        self.model = model

        trace_len = args.trace_length
        if max_pos is not None and trace_len > max_pos:
            trace_len = max_pos
        self.say(
            f"maskaudit-export: {architecture} ({model_type}) from {model_dir}, {self.dtype_name}, "
            f"traced at length {trace_len} (2 rows, one right-padded)"
        )
        # SDPA where it verifies, else eager; the packed layouts where they verify, else the
        # padded one. Each fallback's reason goes into the record.
        layouts = [args.layout] + (["padded"] if args.layout != "padded" else [])
        impls = ["sdpa", "eager"] if args.attention == "sdpa" else ["eager"]
        fallbacks = {"attention_fallback": None, "layout_fallback": None}
        first = None
        for li, layout in enumerate(layouts):
            for ii, impl in enumerate(impls):
                last = li == len(layouts) - 1 and ii == len(impls) - 1
                try:
                    self.attempt(layout, impl, fallbacks, out, model_dir, architecture,
                                 model_type, vocab, max_pos, window, trace_len,
                                 transformers.__version__)
                    return
                except ExportError as exc:
                    # Every attempt failed: the last layout's error, unless a second trace of
                    # the same model failed where its first got further.
                    if exc.code == 2 or (last and ("tracing failed" not in str(exc)
                                                   or first is None)):
                        raise exc
                    if last:
                        raise first
                    first = exc if li == len(layouts) - 1 else None
                    if ii < len(impls) - 1:
                        fallbacks["attention_fallback"] = f"{impl}: {exc}"
                        self.say(f"  {impl} attention failed ({exc}); trying eager")
                    else:
                        fallbacks["layout_fallback"] = f"{layout}: {exc}"
                        self.say(f"  layout {layout} failed ({exc}); trying padded")

    def attempt(self, layout, impl, fallbacks, out, model_dir, architecture, model_type, vocab,
                max_pos, window, trace_len, tf_version) -> None:
        """Traces one layout with one attention implementation, verifies and writes it."""
        args = self.args
        model = self.model
        self.layout = layout
        self.low_precision = {"checks": 0, "worst_trace": 0.0, "worst_eager": 0.0}
        if layout == "packed":
            wrapper = PackedLogits(model, self.dtype).eval()
        elif layout == "padding-free":
            wrapper = PaddingFreeLogits(model, self.dtype).eval()
        else:
            wrapper = LogitsOnly(model).eval()
        ids, mask = self.batch([trace_len, max(1, trace_len - trace_len // 3)], vocab)
        example = self.inputs(ids, mask)
        self.say(f"  layout {layout}: forward({', '.join(LAYOUTS[layout][0])}), "
                 f"{impl} attention")
        substitutes = (
            traceable_substitutes(model) if args.substitutes else contextlib.nullcontext([])
        )
        with warnings.catch_warnings(), torch.no_grad(), substitutes as swapped, \
                attention(model, impl):
            warnings.simplefilter("ignore")
            if swapped:
                self.say(f"  traced with {', '.join(sorted(set(swapped)))} replaced by a stand-in "
                         "computing the same in tensor operations")
            try:
                traced = torch.jit.trace(wrapper, example, strict=False, check_trace=False)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"{architecture}: tracing failed: {first_line(exc)}")
            try:
                probe = traced(*example)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"{architecture}: the trace cannot be run: {first_line(exc)}")
        if not isinstance(probe, Tensor) or probe.dim() != 3:
            raise ExportError(f"{architecture}: the trace does not return logits [B, T, V]")
        vocab_out = int(probe.shape[-1])

        # A temporary folder beside OUT holding a file of OUT's name: the archive's inner
        # folder (named after the file by torch.jit.save) is then OUT's stem, as usual.
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            self.save_verify_rename(
                traced, tmp_dir / out.name, out, architecture, model_type, vocab, vocab_out,
                max_pos, window, trace_len, probe.dtype, tf_version,
                dict(fallbacks, attention=impl),
            )
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def inputs(self, ids: Tensor, mask: Tensor, positions: Optional[Tensor] = None):
        """The traced forward's arguments for a batch; positions 0..T-1 unless given (what
        maskaudit passes for rows that are not packed)."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        if self.layout == "packed":
            return (ids, mask, positions)
        if self.layout == "padding-free":
            return (ids, positions)
        return (ids, mask)

    def verify_packed(self, loaded, architecture, vocab, trace_len, limit) -> List[List[int]]:
        """Packed rows through the trace against every document run alone in eager."""
        n = trace_len
        layouts = [[[3, n // 2 + 1, n]], [[n, 5], [2, 2, 2, 2, 7], [2 * n + 3], [1, 9, 4]]]
        checked = []
        worst = 0.0
        for rows in layouts:
            rows = [[min(d, limit) if limit else d for d in docs] for docs in rows]
            width = max(sum(docs) for docs in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            pos = torch.zeros_like(ids)
            for r, docs in enumerate(rows):
                total = sum(docs)
                ids[r, :total] = torch.randint(1, vocab, (total,), generator=self.gen)
                mask[r, :total] = 1
                pos[r] = torch.cat([torch.arange(d) for d in docs]
                                   + [torch.arange(total, total + width - total)])
            ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
            try:
                with torch.no_grad():
                    got = loaded(*self.inputs(ids, mask, pos)).float()
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"{architecture}: the trace fails on packed rows: "
                                  f"{first_line(exc)}")
            diff = 0.0
            ok = True
            for r, docs in enumerate(rows):
                at = 0
                parts = []
                for d in docs:
                    one = ids[r:r + 1, at:at + d]
                    parts.append((one, torch.ones_like(one)))
                    at += d
                want = torch.cat([self.eager(i, m).float() for i, m in parts], dim=1)
                total = sum(docs)
                check = torch.ones(1, total, dtype=torch.long, device=self.device)
                row_diff = relative_difference(want, got[r:r + 1, :total], check)
                diff = max(diff, row_diff)
                ok = ok and self.passes(row_diff, want, got[r:r + 1, :total], check, parts)
            worst = max(worst, diff)
            self.say(f"  packed, batch {len(rows)}, documents {rows}: max relative logit "
                     f"difference {diff:.2e} against each document run alone"
                     + self.take_notes() + ("" if ok else "  FAIL"))
            if not ok:
                raise ExportError(f"{architecture}: packed rows differ from their documents run "
                                  f"alone by {diff:.2e} (tolerance {self.tolerance:.0e})")
            checked.extend(rows)
        self.packed_worst = worst
        return checked

    def eager(self, ids: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad():
            return self.wrapper(ids, mask)

    def take_notes(self) -> str:
        """`passes`' notes since the last call, for the end of a check's line."""
        notes, self.notes = self.notes, []
        return f" ({'; '.join(notes)})" if notes else ""

    def passes(self, diff: float, want: Tensor, got: Tensor, check: Tensor,
               ids_masks) -> bool:
        """Whether a difference passes. In float32, the tolerance. In bfloat16 and float16 two
        correct implementations (eager and SDPA attention, a packed row and its documents
        alone) differ by roundings that grow with depth and length, past any fixed tolerance
        on a deep model at a few thousand tokens. So there, past the tolerance, both are held
        against the float32 eager model (the same weights, upcast): the trace passes when it
        is at most LOW_PRECISION_FACTOR times as far from it as the eager model itself.
        `ids_masks` are the (ids, mask) inputs whose eager logits, concatenated along T,
        make `want`."""
        if diff <= self.tolerance:
            return True
        if self.dtype == torch.float32 or self.args.tolerance is not None:
            return False
        if self.reference_wrapper is None:
            try:
                self.reference_wrapper = LogitsOnly(copy.deepcopy(self.model).float()).eval()
            except (torch.OutOfMemoryError, MemoryError):
                self.reference_wrapper = False
                torch.cuda.empty_cache()
        if self.reference_wrapper is False:
            return False
        with torch.no_grad():
            ref = torch.cat([self.reference_wrapper(i, m).float() for i, m in ids_masks], dim=1)
        eager_err = relative_difference(ref, want, check)
        trace_err = relative_difference(ref, got, check)
        self.low_precision["checks"] += 1
        self.low_precision["worst_trace"] = max(self.low_precision["worst_trace"], trace_err)
        self.low_precision["worst_eager"] = max(self.low_precision["worst_eager"], eager_err)
        ok = trace_err <= max(self.tolerance, LOW_PRECISION_FACTOR * eager_err)
        self.notes.append(f"against float32: trace {trace_err:.2e}, eager {eager_err:.2e}, "
                          f"{'within' if ok else 'past'} {LOW_PRECISION_FACTOR:g}x")
        return ok

    def eager_on_cpu(self, ids: Tensor, mask: Tensor) -> None:
        """The eager forward on the CPU, raising where it fails. Past max_position_embeddings a
        model with learned positions indexes past its table: an IndexError on the CPU, but on
        CUDA a device-side assert, after which nothing in this process can use the GPU. So off
        the CPU, whether the eager model fails past its limit is asked on the CPU first. A
        failure of another kind (an operation or the memory the CPU lacks) says nothing either
        way: it is raised as NotCheckedOnCpu, and the limit is recorded to be safe."""
        self.wrapper.to("cpu")
        try:
            with torch.no_grad():
                self.wrapper(ids.cpu(), mask.cpu())
        except IndexError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise NotCheckedOnCpu(first_line(exc, 120)) from exc
        finally:
            self.wrapper.to(self.device)

    def check_causal(self, loaded, architecture, vocab, length) -> None:
        """A next-token loss is meaningless if the logits at t see token t+1 (a bidirectional
        encoder loaded as a causal LM), or if one row's logits depend on another row."""
        rows = padded_rows(length)
        ids, mask = self.batch(rows, vocab)
        k = length // 2
        changed = ids.clone()
        changed[0, k] = changed[0, k] % (vocab - 1) + 1
        with torch.no_grad():
            before = loaded(*self.inputs(ids, mask)).float()
            after = loaded(*self.inputs(changed, mask)).float()
        scale = float(before[mask.bool()].abs().max().clamp_min(1e-12))
        earlier = float((after[0, :k] - before[0, :k]).abs().max()) / scale
        others = float((after[1:] - before[1:]).abs().max()) / scale
        self.say(f"  causal: changing token {k} of row 0 moves the logits before it by "
                 f"{earlier:.2e} and the other rows by {others:.2e}")
        # Exactly 0 in a causal model: the masked attention weights are exactly 0.
        limit = min(self.tolerance, 1e-6)
        if not earlier <= limit:
            raise ExportError(
                f"{architecture}: not causal: the logits at positions before a changed token "
                f"move by {earlier:.2e} (a bidirectional model?); a next-token loss over it "
                "is meaningless; not written"
            )
        if not others <= limit:
            raise ExportError(
                f"{architecture}: rows are not independent: changing one row moves the "
                f"logits of the others by {others:.2e}; not written"
            )

    def save_verify_rename(self, traced, tmp, out, architecture, model_type, vocab, vocab_out,
                           max_pos, window, trace_len, logits_dtype, tf_version,
                           extra) -> None:
        # Save, then verify what was saved: the file the user gets is the one checked.
        try:
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location=self.device)
        except Exception as exc:  # noqa: BLE001
            hint = ""
            if "Could not export Python function" in str(exc):
                hint = " (the model calls a torch.autograd.Function or other Python code)"
            raise ExportError(f"{architecture}: the trace cannot be saved in TorchScript{hint}: "
                              f"{first_line(exc)}")
        loaded.eval()

        lengths = {max(2, trace_len // 2), trace_len, 2 * trace_len + 3}
        reasons = {}
        original = original_max_positions(self.config)
        if original is not None and original + 8 <= self.args.max_verify_length:
            lengths.add(original + 8)
            reasons[original + 8] = f"past original_max_position_embeddings ({original})"
        if window is not None and window + 8 <= self.args.max_verify_length:
            lengths.add(window + 8)
            reasons[window + 8] = f"past sliding_window ({window})"
        skipped = []
        if max_pos is not None:
            # At the limit itself too: a model whose eager forward stops there (learned
            # positions) is still verified over every length it accepts.
            if max_pos <= self.args.max_verify_length:
                lengths.add(max_pos)
                reasons[max_pos] = f"at max_position_embeddings ({max_pos})"
            if max_pos + 8 <= self.args.max_verify_length:
                lengths.add(max_pos + 8)
                reasons[max_pos + 8] = f"past max_position_embeddings ({max_pos})"
            else:
                skipped.append(
                    f"not checked past max_position_embeddings ({max_pos}): longer than "
                    f"--max-verify-length {self.args.max_verify_length}"
                )
        cases = [(n, padded_rows(n)) for n in sorted(lengths)]
        cases.append((trace_len + 3, [trace_len + 3]))  # a batch of 1
        cases.append((trace_len, [trace_len, trace_len]))  # no padding at all

        verified: List[int] = []
        worst = worst_pad = 0.0
        length_limit = None
        failures = []
        for n, rows in cases:
            ids, mask = self.batch(rows, vocab)
            if len(rows) == 1:
                what = f"batch 1,  length {n:5d}"
            elif rows[0] == rows[-1]:
                what = f"batch {len(rows)},  length {n:5d}, no padding"
            else:
                what = f"batch {len(rows)},  length {n:5d}, right-padded"
            note = reasons.get(n, "")
            if length_limit is not None and n > length_limit:
                self.say(f"  {what}: skipped, past the model's limit of {length_limit} tokens")
                continue
            try:
                if max_pos is not None and n > max_pos and self.device.type != "cpu":
                    self.eager_on_cpu(ids, mask)
                want = self.eager(ids, mask)
            except Exception as exc:  # noqa: BLE001
                if max_pos is not None and n > max_pos:
                    length_limit = max_pos
                    if isinstance(exc, NotCheckedOnCpu):
                        why = (f"not checked (on the CPU, where the check runs off it, the eager "
                               f"model fails for another reason: {exc}); {max_pos} tokens is "
                               f"recorded as its limit, to be safe")
                    else:
                        why = (f"the eager model itself fails there ({first_line(exc, 120)}); "
                               f"its limit, {max_pos} tokens, is recorded")
                    self.say(f"  {what}: {note}: {why}")
                    continue
                raise ExportError(f"{architecture}: the eager model fails at length {n}: "
                                  f"{first_line(exc)}")
            try:
                with torch.no_grad():
                    got = loaded(*self.inputs(ids, mask))
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"{architecture}: the trace fails at length {n}, batch "
                                  f"{len(rows)}: {first_line(exc)}")
            if got.shape != want.shape:
                raise ExportError(f"{architecture}: at length {n} the trace returns shape "
                                  f"{list(got.shape)}, eager {list(want.shape)}")
            diff = relative_difference(want, got, mask)
            worst = max(worst, diff)
            verified.append(n)
            ok = self.passes(diff, want, got, mask, [(ids, mask)])
            line = f"  {what}: max relative logit difference {diff:.2e}"
            if not mask.bool().all():
                # Not a failure (only real positions are trained), but maskaudit's
                # all_positions_mean reads the padding's logits too.
                at_pad = relative_difference(want, got, mask.eq(0))
                worst_pad = max(worst_pad, at_pad)
                if at_pad > self.tolerance:
                    line += f" (at padding: {at_pad:.2e})"
            if note:
                line += f"  ({note})"
            line += self.take_notes()
            if not ok:
                line += "  FAIL"
                failures.append((n, rows, diff, note))
            self.say(line)
        for line in skipped:
            self.say(f"  {line}")
        if not failures:
            self.check_causal(loaded, architecture, vocab, trace_len)
        packed_rows = []
        if not failures and "packed_position_ids" in LAYOUTS[self.layout][1]:
            packed_rows = self.verify_packed(loaded, architecture, vocab, trace_len,
                                             length_limit or max_pos)
        if failures:
            n, rows, diff, note = max(failures, key=lambda f: f[2])
            hint = ""
            rope = getattr(self.config, "rope_scaling", None) or getattr(
                self.config, "rope_parameters", None
            )
            if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
                hint = " (dynamic RoPE: a trace keeps the frequencies of the traced length)"
            where = f", {note}" if note else ""
            raise ExportError(
                f"{architecture}: the trace differs from the eager model by {diff:.2e} "
                f"(tolerance {self.tolerance:.0e}) at length {n}{where}, batch {len(rows)}"
                f"{hint}; not written"
            )

        record = {
            "format_version": FORMAT_VERSION,
            "forward_args": LAYOUTS[self.layout][0],
            "layouts": LAYOUTS[self.layout][1],
            "verified_packed_rows": packed_rows,
            "attention": extra["attention"],
            "attention_fallback": extra["attention_fallback"],
            "layout_fallback": extra["layout_fallback"],
            "output": "logits",
            "architecture": architecture,
            "model_type": model_type,
            "dtype": self.dtype_name,
            "logits_dtype": DTYPE_NAMES.get(logits_dtype, str(logits_dtype)),
            "vocab_size": vocab_out,
            "max_position_embeddings": max_pos,
            "length_limit": length_limit,
            "sliding_window": window,
            "trace_length": trace_len,
            "verified_lengths": sorted(set(verified)),
            "max_relative_difference": worst,
            "max_relative_difference_padding": worst_pad,
            "tolerance": self.tolerance,
            "low_precision_reference": (
                None if not self.low_precision["checks"] else {
                    "rule": f"past the tolerance, at most {LOW_PRECISION_FACTOR:g}x the eager "
                            "model's own difference from the float32 model",
                    "checks": self.low_precision["checks"],
                    "worst_trace_vs_float32": self.low_precision["worst_trace"],
                    "worst_eager_vs_float32": self.low_precision["worst_eager"],
                }),
            "exporter": EXPORTER,
            "torch_version": torch.__version__,
            "transformers_version": tf_version,
            "device": str(self.device),
        }
        text = json.dumps(record, indent=2) + "\n"
        try:
            torch.jit.save(loaded, str(tmp), _extra_files={RECORD_NAME: text})
            os.replace(tmp, out)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{out}: cannot write it: {first_line(exc)}")
        config_vocab = config_int(self.config, "vocab_size")
        vocab_note = "" if config_vocab in (None, vocab_out) else f" (config says {config_vocab})"
        self.say(
            f"wrote {out}: forward({', '.join(record['forward_args'])}) -> logits "
            f"[B, T, {vocab_out}]"
            f"{vocab_note}, {self.dtype_name}, {extra['attention']} attention, layouts "
            f"{', '.join(record['layouts'])}; verified at lengths "
            f"{', '.join(map(str, record['verified_lengths']))}; max relative difference "
            f"{worst:.2e} (tolerance {self.tolerance:.0e})"
        )


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="maskaudit-export",
        description="Export a Hugging Face causal LM directory to TorchScript for maskaudit, "
        "verified against the eager model.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("out", metavar="OUT.pt")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu",
                   help="where to trace and verify: cpu, cuda or cuda:N (default cpu). A trace "
                        "keeps the device of the tensors the model creates, so export on the kind "
                        "of device you will audit on")
    p.add_argument("--trace-length", type=int, default=16,
                   help="padded length of the traced example batch (default 16)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest max relative logit difference accepted "
                   "(default 1e-4 for float32, 2e-2 for bfloat16/float16)")
    p.add_argument("--max-verify-length", type=int, default=4096,
                   help="longest length run in verification (default 4096)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="packed",
                   help="the traced forward: packed = forward(input_ids, attention_mask, "
                   "position_ids), documents of a packed row kept apart by their position ids "
                   "(default); padding-free = forward(input_ids, position_ids); padded = "
                   "forward(input_ids, attention_mask). A packed layout that fails verification "
                   "falls back to padded, the reason in the record")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                   help="trace with SDPA attention where it verifies against eager, else eager "
                   "(the reason in the record); eager = eager only")
    p.add_argument("--no-substitutes", dest="substitutes", action="store_false",
                   help="trace every module as it is "
                   "(no stand-in for Bloom's GeLU or dynamic RoPE)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(SEED)
    # Verify the archive as maskaudit runs it (model::configure_libtorch): without the profiling
    # executor, whose fused CUDA kernels keep bf16 intermediates in float32 from the third call
    # on, so the same archive would differ from eager by more than the bf16 rounding.
    torch._C._jit_set_profiling_mode(False)
    try:
        Exporter(args).run()
    except ExportError as exc:
        print(f"maskaudit-export: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        print("maskaudit-export: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
