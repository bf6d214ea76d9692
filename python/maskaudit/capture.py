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

    def snapshot(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """CPU copies of the batch's tensors, taken before the trainer's code sees them."""
        import torch

        copied = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                copied[name] = value.detach().to("cpu", copy=True)
        return copied

    def add(self, batch: Dict[str, Any], step: int, micro: int, num_items: Any, loss: Any) -> None:
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
        table = pa.table(self.columns) if self.columns else pa.table({ROW: pa.array([], pa.int64())})
        meta = dict(self.settings)
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


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "trl", "accelerate"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def capture(trainer, path, steps: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS):
    """Records the first `steps` optimizer steps of `trainer` (a `transformers.Trainer`) into
    the Parquet file `path`; call it before `trainer.train()`. Returns the recorder, whose
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
        out = original(model, inputs, return_outputs=return_outputs,
                       num_items_in_batch=num_items_in_batch, **kwargs)
        if recording:
            if state["step"] != step:
                state["step"], state["micro"] = step, 0
            loss = out[0] if isinstance(out, tuple) else out
            recorder.add(batch, step, state["micro"], num_items_in_batch, loss)
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
                    world_size: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS) -> ForwardCapture:
    """Records a plain PyTorch loop: every forward of `model` in training mode is a
    micro-batch, `accumulation` of them an optimizer step, for `steps` steps. The batch is read
    from the forward's keyword arguments (input_ids, labels, attention_mask, …), the loss from
    its output's `loss` when there is one."""
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

    def pre(module, args, kwargs):
        if module.training and not recorder.done:
            merged = dict(kwargs)
            if args and "input_ids" not in merged:
                merged["input_ids"] = args[0]
            pending["batch"] = recorder.snapshot(merged)
        return None

    def post(module, args, kwargs, output):
        batch = pending.pop("batch", None)
        if batch is None:
            return None
        step, micro = divmod(state["calls"], accumulation)
        state["calls"] += 1
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        recorder.add(batch, step, micro, None, loss)
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
