"""Capture a real training run's micro-batches for `maskaudit check`.

The bugs maskaudit looks for live in a run's collator, trainer and loss, not in a hand-made
dataset. A capture records, for the first optimizer steps of the real run, every micro-batch
exactly as the model receives it (every [B, T] tensor of the batch: input_ids, labels,
attention_mask, position_ids, …; and cu_seq_lens of a padding-free row), with where it sits in
the run (step, micro-batch within the step, rank, world size, gradient accumulation), the
trainer's count `num_items_in_batch` and the loss the trainer computed for it. It writes one
Parquet file, a row per sequence, with the run's settings in the file's metadata under
`maskaudit.capture`.

Two ways in:

- `capture(trainer, path, steps=N)`: one call before `trainer.train()`, for
  `transformers.Trainer` and its subclasses (trl's SFTTrainer, …). It wraps the trainer's
  `compute_loss` on that instance: the batch it is given is what the model receives, with the
  step's `num_items_in_batch`, and what it returns is the trainer's loss.
- `capture_forward(model, path, steps=N, accumulation=K)`: a forward hook (`with_kwargs`) for a
  plain PyTorch loop; each forward in training mode is one micro-batch, K of them a step, and
  the loss is the output's `loss` when the model computed one.

A capture never changes training: it copies the tensors to the CPU before the trainer's code
runs (which may pop `labels` from the batch) and leaves every value it returns as it was.
Once `steps` optimizer steps are recorded (or training ends) the file is written, atomically
(a temporary file beside it, then a rename), and the wrapper is removed; later steps pay
nothing. `max_tokens` bounds the file: past it the capture stops early and says so. On several
ranks each rank writes its own file, `path` with `.rank<r>` before the extension.

Per-token losses (`token_losses=True`, the default): for each captured micro-batch, the
next-token cross-entropy of the logits the model produced, at every position t < T-1 of every
row against input_ids[t+1] (no mask: the mask is applied by `check`, as it applies it to the
losses it recomputes from a model), in float32, chunked, on the rank's device, under no_grad.
They are a column `maskaudit_token_losses` (a list of T-1 floats a row), so that
`maskaudit check --captured-losses` audits every rank of a run without the model. The logits are
taken from the model's output `logits`; where a fused or chunked loss leaves the output without
them, from the LM head's output (`get_output_embeddings()`); where the head is bypassed too (a
fused linear cross-entropy such as trl's), from the backbone's last hidden state times the
head's weight, in chunks. The settings' `token_losses` says which (`logits`, `lm_head`,
`hidden_states`), or `unavailable`, or `off`. The hooks exist only during captured forwards.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

CAPTURE_VERSION = 1
META_KEY = b"maskaudit.capture"
DEFAULT_MAX_TOKENS = 1 << 24

# Per-row columns besides the batch's own tensors; their names cannot clash with a field.
STEP, MICRO, RANK, ROW = "maskaudit_step", "maskaudit_micro_batch", "maskaudit_rank", "maskaudit_row"
NUM_ITEMS, LOSS = "maskaudit_num_items_in_batch", "maskaudit_trainer_loss"
TOKEN_LOSSES = "maskaudit_token_losses"
# Logit elements a chunk of the per-token cross-entropy upcasts to float32 at once (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def _rank_path(path: Path, rank: int, world_size: int) -> Path:
    if world_size <= 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _scalar(value: Any) -> Optional[float]:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach()
        if value.numel() != 1:
            return None
        value = value.reshape(()).item()
    return float(value)


class _Recorder:
    """Micro-batches in memory until the capture is written."""

    def __init__(self, path: Path, steps: int, max_tokens: int, rank: int, world_size: int):
        if steps < 1:
            raise ValueError(f"steps must be at least 1, not {steps}")
        self.path = _rank_path(Path(path), rank, world_size)
        self.steps = steps
        self.max_tokens = max_tokens
        self.rank = rank
        self.world_size = world_size
        self.columns: Dict[str, List[Any]] = {}
        self.rows = 0
        self.tokens = 0
        self.done = False
        self.truncated = False
        self.settings: Dict[str, Any] = {}
        # The token losses' hooks, when on: their settings join the file's at the end.
        self.token_losses: Optional[_TokenLosses] = None

    def snapshot(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """CPU copies of the batch's tensors, taken before the trainer's code sees them."""
        import torch

        copied = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                copied[name] = value.detach().to("cpu", copy=True)
        return copied

    def add(self, batch: Dict[str, Any], step: int, micro: int, num_items: Any, loss: Any,
            token_losses: Any = None) -> None:
        import torch

        ids = batch.get("input_ids")
        if ids is None or ids.dim() != 2:
            return
        rows, width = ids.shape
        if self.tokens + rows * width > self.max_tokens:
            self.truncated = True
            self.done = True
            warnings.warn(
                f"maskaudit.capture: stopping at step {step}: the capture would pass "
                f"max_tokens={self.max_tokens}; {self.path} holds the steps before it"
            )
            return
        per_row: Dict[str, List[Any]] = {}
        for name, tensor in batch.items():
            if tensor.dim() == 2 and tensor.shape == ids.shape and not tensor.is_floating_point():
                per_row[name] = tensor.to(torch.int64).tolist()
        # A padding-free row: its documents' boundaries, as maskaudit's cu_seqlens field.
        cu = batch.get("cu_seq_lens_q")
        if cu is not None and rows == 1 and cu.dim() == 1:
            per_row["cu_seqlens"] = [cu.to(torch.int64).tolist()]
        if token_losses is not None and tuple(token_losses.shape) == (rows, width - 1):
            per_row[TOKEN_LOSSES] = token_losses.tolist()
        extra = {
            STEP: step, MICRO: micro, RANK: self.rank, NUM_ITEMS: _scalar(num_items),
            LOSS: _scalar(loss),
        }
        for r in range(rows):
            for name in set(self.columns) | set(per_row) | set(extra) | {ROW}:
                column = self.columns.setdefault(name, [None] * self.rows)
                if name == ROW:
                    column.append(r)
                elif name in extra:
                    column.append(extra[name])
                else:
                    column.append(per_row[name][r] if name in per_row else None)
            self.rows += 1
        self.tokens += rows * width

    def write(self) -> Path:
        """The Parquet file, written beside its destination and renamed onto it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.done = True
        columns = dict(self.columns)
        if TOKEN_LOSSES in columns:
            columns[TOKEN_LOSSES] = pa.array(columns[TOKEN_LOSSES], pa.list_(pa.float32()))
        table = pa.table(columns) if columns else pa.table({ROW: pa.array([], pa.int64())})
        meta = dict(self.settings)
        if self.token_losses is None:
            meta["token_losses"] = "off"
        else:
            meta.update(self.token_losses.settings(True))
        meta.update({
            "version": CAPTURE_VERSION,
            "rows": self.rows,
            "tokens": self.tokens,
            "steps_asked": self.steps,
            "truncated": self.truncated,
            "rank": self.rank,
            "world_size": self.world_size,
        })
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.close(fd)
        try:
            pq.write_table(table, temp)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return self.path


def _row_losses(ids, logits_of, vocab: int, width: int):
    """Per-token cross-entropy [B, T-1] in float32 against the next input id. `logits_of(rows,
    s, e)` gives the logits of a slice of rows at positions s..e-1; a chunk holds whole rows
    where they fit CHUNK_ELEMENTS, else part of one row."""
    import torch
    import torch.nn.functional as F

    rows = ids.shape[0]
    out = torch.empty(rows, width - 1, dtype=torch.float32, device=ids.device)
    span = max(1, CHUNK_ELEMENTS // max(1, vocab))
    per = max(1, span // (width - 1))
    for b in range(0, rows, per):
        r = slice(b, min(rows, b + per))
        for s in range(0, width - 1, span):
            e = min(width - 1, s + span)
            x = logits_of(r, s, e).float()
            out[r, s:e] = F.cross_entropy(x.reshape(-1, x.shape[-1]),
                                          ids[r, s + 1:e + 1].reshape(-1),
                                          reduction="none").view(x.shape[:2])
    return out


class _TokenLosses:
    """Hooks that turn one forward's logits into per-token losses, attached only while a
    captured micro-batch runs. `take()` gives (losses on the CPU, source) or None."""

    def __init__(self, model):
        self.model = model
        self.handles: List[Any] = []
        self.head_outputs: List[Any] = []
        self.hidden = None
        self.result = None
        self.sources: List[str] = []
        self.vocab: Optional[int] = None

    def attach(self, on_model: bool = True) -> None:
        """Hooks on the head and the backbone, and with `on_model` on the model's output (else
        the caller passes the output to `on_output`)."""
        model = self.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base = getattr(model, "base_model", None)
        if head is not None:
            self.handles.append(head.register_forward_hook(self._on_head))
        if base is not None and base is not model:
            self.handles.append(base.register_forward_hook(self._on_base))
        if on_model:
            self.handles.append(model.register_forward_hook(self.on_output, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.head_outputs, self.hidden = [], None

    def take(self):
        result, self.result = self.result, None
        return result

    def _on_head(self, module, args, output):
        self.head_outputs.append(output)

    def _on_base(self, module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, (tuple, list)) and output:
            hidden = output[0]
        self.hidden = hidden

    def on_output(self, module, args, kwargs, output):
        import torch

        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        try:
            if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 1:
                with torch.no_grad():
                    self.result = self._losses(ids, output)
        finally:
            self.head_outputs, self.hidden = [], None
        return None

    def _losses(self, ids, output):
        import torch
        import torch.nn.functional as F

        rows, width = ids.shape
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        source = "logits"
        if not self._whole(logits, ids):
            # A fused or chunked loss: the head's own output, when it ran once on every position.
            heads = [h for h in self.head_outputs if self._whole(h, ids)]
            logits, source = (heads[0], "lm_head") if len(heads) == 1 else (None, None)
        if logits is not None:
            logits = logits.detach()
            vocab = logits.shape[-1]
            ids = ids.to(logits.device)
            losses = _row_losses(ids, lambda r, s, e: logits[r, s:e], vocab, width)
        else:
            # The head bypassed too (a fused linear cross-entropy): the backbone's last hidden
            # state through the head's weight, a chunk at a time.
            head = self.model.get_output_embeddings()
            hidden = self.hidden
            if (head is None or not isinstance(hidden, torch.Tensor)
                    or tuple(hidden.shape[:2]) != (rows, width)):
                self.sources.append("unavailable")
                return None
            if type(head.weight).__name__ == "DTensor":
                # A sharded head (FSDP2, tensor parallel): outside the forward its weight is a
                # shard, and a shard's logits are not the model's.
                self.sources.append("unavailable")
                return None
            weight, bias = head.weight.detach(), getattr(head, "bias", None)
            bias = None if bias is None else bias.detach()
            hidden = hidden.detach().to(weight.device)
            vocab = weight.shape[0]
            ids = ids.to(weight.device)
            softcap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)

            def logits_of(r, s, e):
                x = F.linear(hidden[r, s:e], weight, bias)
                if softcap:
                    x = torch.tanh(x.float() / softcap) * softcap
                return x

            losses = _row_losses(ids, logits_of, vocab, width)
            source = "hidden_states"
        self.vocab = int(vocab)
        self.sources.append(source)
        return losses.cpu()

    def _whole(self, tensor, ids) -> bool:
        """Logits of every position over the whole vocabulary: not a tensor-parallel shard
        (a DTensor, or fewer columns than the config's vocabulary), whose cross-entropy would
        be over part of the vocabulary."""
        import torch

        if not isinstance(tensor, torch.Tensor) or type(tensor).__name__ == "DTensor":
            return False
        config = getattr(self.model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        vocab = getattr(get_text() if callable(get_text) else config, "vocab_size", None)
        return (tensor.dim() == 3 and tuple(tensor.shape[:2]) == tuple(ids.shape)
                and (not isinstance(vocab, int) or tensor.shape[-1] >= vocab))

    def settings(self, on: bool) -> Dict[str, Any]:
        """What the capture's settings say of the token losses."""
        if not on:
            return {"token_losses": "off"}
        seen = sorted(set(self.sources))
        out: Dict[str, Any] = {"token_losses": ",".join(seen) or "unavailable"}
        if self.vocab is not None:
            out["vocab_size"] = self.vocab
        return out


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "trl", "accelerate"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def capture(trainer, path, steps: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS,
            token_losses: bool = True):
    """Records the first `steps` optimizer steps of `trainer` (a `transformers.Trainer`) into
    the Parquet file `path`; call it before `trainer.train()`. With `token_losses`, each
    micro-batch's per-token losses too (see the module's text). Returns the recorder, whose
    `path` is the file written."""
    from transformers import TrainerCallback

    args = trainer.args
    recorder = _Recorder(path, steps, max_tokens, int(args.process_index), int(args.world_size))
    recorder.settings = {
        "source": "trainer",
        "trainer": type(trainer).__name__,
        "model": type(trainer.model).__name__,
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "per_device_train_batch_size": int(args.per_device_train_batch_size),
        "model_accepts_loss_kwargs": bool(getattr(trainer, "model_accepts_loss_kwargs", False)),
        "average_tokens_across_devices": bool(getattr(args, "average_tokens_across_devices", False)),
        "compute_loss_func": getattr(trainer, "compute_loss_func", None) is not None,
        "loss_is_scaled_for_ga": getattr(trainer, "loss_is_scaled_for_ga", None),
        "versions": _versions(),
    }
    original = trainer.compute_loss
    state = {"step": None, "micro": 0}

    def finish():
        if trainer.__dict__.get("compute_loss") is wrapper:
            del trainer.__dict__["compute_loss"]
        if not recorder.done or recorder.truncated:
            recorder.write()

    def wrapper(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        step = int(trainer.state.global_step)
        recording = model.training and not recorder.done and step < recorder.steps
        batch = recorder.snapshot(inputs) if recording else None
        hooks = recorder.token_losses if recording else None
        if hooks is not None:
            hooks.attach()
        try:
            out = original(model, inputs, return_outputs=return_outputs,
                           num_items_in_batch=num_items_in_batch, **kwargs)
        finally:
            if hooks is not None:
                hooks.detach()
        if recording:
            if state["step"] != step:
                state["step"], state["micro"] = step, 0
            loss = out[0] if isinstance(out, tuple) else out
            losses = hooks.take() if hooks is not None else None
            recorder.add(batch, step, state["micro"], num_items_in_batch, loss, losses)
            state["micro"] += 1
        return out

    logged: Dict[str, float] = {}
    recorder.settings["logged_losses"] = logged
    recorder.settings["logging_steps"] = getattr(args, "logging_steps", None)

    # The file is written once the last captured step's loss is logged, or, where nothing is
    # logged, at the end of the step after it (or of training).
    class _Done(TrainerCallback):
        def on_step_end(self, args, train_state, control, **kwargs):
            if int(train_state.global_step) > recorder.steps and not recorder.done:
                finish()

        def on_log(self, args, train_state, control, logs=None, **kwargs):
            step = int(train_state.global_step)
            if logs and "loss" in logs and 0 < step <= recorder.steps and not recorder.done:
                logged[str(step - 1)] = float(logs["loss"])
            if step >= recorder.steps and not recorder.done:
                finish()

        def on_train_end(self, args, train_state, control, **kwargs):
            if not recorder.done:
                finish()

    if token_losses:
        # The unwrapped model: hooks on it run inside DDP's and accelerate's wrappers.
        recorder.token_losses = _TokenLosses(trainer.model)
    trainer.compute_loss = wrapper
    trainer.add_callback(_Done())
    return recorder


class ForwardCapture:
    """What `capture_forward` returns: `close()` writes the file early (else it is written
    once `steps` steps are recorded)."""

    def __init__(self, recorder: _Recorder, handle):
        self.recorder = recorder
        self._handle = handle

    @property
    def path(self) -> Path:
        return self.recorder.path

    def close(self) -> Path:
        self._handle.remove()
        if not self.recorder.done or self.recorder.truncated:
            self.recorder.write()
        return self.recorder.path


def capture_forward(model, path, steps: int = 1, accumulation: int = 1, rank: int = 0,
                    world_size: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS,
                    token_losses: bool = True) -> ForwardCapture:
    """Records a plain PyTorch loop: every forward of `model` in training mode is a
    micro-batch, `accumulation` of them an optimizer step, for `steps` steps. The batch is read
    from the forward's keyword arguments (input_ids, labels, attention_mask, …), the loss from
    its output's `loss` when there is one, and `num_items_in_batch` when the loop passes one.
    `model` is the module itself, not its DistributedDataParallel wrapper (hooks on it run
    inside the wrapper)."""
    if accumulation < 1:
        raise ValueError(f"accumulation must be at least 1, not {accumulation}")
    recorder = _Recorder(path, steps, max_tokens, rank, world_size)
    recorder.settings = {
        "source": "forward",
        "model": type(model).__name__,
        "gradient_accumulation_steps": int(accumulation),
        "versions": _versions(),
    }
    state = {"calls": 0}
    pending: Dict[str, Any] = {}
    # Attached by `pre` for a recorded forward only, read by `post`.
    hooks = _TokenLosses(model) if token_losses else None
    recorder.token_losses = hooks

    def pre(module, args, kwargs):
        if module.training and not recorder.done:
            merged = dict(kwargs)
            if args and "input_ids" not in merged:
                merged["input_ids"] = args[0]
            pending["batch"] = recorder.snapshot(merged)
            pending["num_items"] = kwargs.get("num_items_in_batch")
            if hooks is not None:
                hooks.attach(on_model=False)
        return None

    def post(module, args, kwargs, output):
        batch = pending.pop("batch", None)
        if batch is None:
            return None
        losses = None
        if hooks is not None:
            hooks.on_output(module, args, kwargs, output)
            hooks.detach()
            losses = hooks.take()
        step, micro = divmod(state["calls"], accumulation)
        state["calls"] += 1
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        recorder.add(batch, step, micro, pending.pop("num_items", None), loss, losses)
        if state["calls"] >= steps * accumulation and not recorder.done:
            capture.close()
        return None

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]

    class _Both:
        def remove(self):
            for h in handles:
                h.remove()

    capture = ForwardCapture(recorder, _Both())
    return capture
