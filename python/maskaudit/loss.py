"""Trace a Python loss into the TorchScript file that `maskaudit check --loss` takes.

A trainer's loss is Python: transformers' `ForCausalLMLoss` (which does not script:
`F.pad(..., value=-100)` is an int), or a `compute_loss` of one's own. `trace_loss` wraps the
callable in a module whose `forward` takes the tensors `--loss-args` names, in that order,
traces it on example tensors (from a capture, or made up), checks the trace against the
callable on a batch of another shape, and saves it:

    import maskaudit
    from transformers.loss.loss_utils import ForCausalLMLoss
    maskaudit.trace_loss(ForCausalLMLoss, "loss.pt", args=("logits", "labels"),
                         vocab_size=32000, capture="run.parquet")

then `maskaudit check model.pt data --loss loss.pt --loss-args logits,labels`. Keyword
arguments other than the ones below (`vocab_size=…`) are passed to the callable on every call,
as constants of the trace.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

# The tensors `--loss-args` can name (maskaudit's LossArg), and how each is made from a batch.
LOSS_ARGS = ("logits", "input_ids", "labels", "attention_mask", "shift_logits", "targets",
             "loss_mask", "num_items_in_batch")


def _example_batch(capture: Optional[str], rows: int, length: int, vocab: int, seed: int):
    """input_ids, attention_mask and labels: the capture's first micro-batch, or made up
    (right padding, a prompt of 2 tokens masked)."""
    import torch

    if capture is not None:
        import pyarrow.parquet as pq

        table = pq.read_table(capture).to_pydict()
        keys = list(zip(table["maskaudit_step"], table["maskaudit_micro_batch"]))
        first = [i for i, k in enumerate(keys) if k == keys[0]]
        batch = {name: torch.tensor([table[name][i] for i in first])
                 for name in ("input_ids", "attention_mask", "labels") if name in table}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if "labels" not in batch:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    attention = torch.ones_like(ids)
    for r in range(1, rows):
        attention[r, length - r:] = 0
    ids = ids.masked_fill(attention == 0, 0)
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _tensors(batch: Dict[str, Any], args: Sequence[str], vocab: int, seed: int):
    """The tensors `args` names, as maskaudit hands them to a loss (docs/guide.md)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids, mask = batch["input_ids"], batch["labels"] != -100
    b, t = ids.shape
    logits = torch.randn(b, t, vocab, generator=g)
    made = {
        "logits": logits,
        "input_ids": ids,
        "labels": batch["labels"],
        "attention_mask": batch["attention_mask"],
        "shift_logits": logits[:, :-1].contiguous(),
        "targets": ids[:, 1:].contiguous(),
        "loss_mask": mask[:, 1:].float(),
        "num_items_in_batch": mask[:, 1:].sum(),
    }
    return tuple(made[a] for a in args)


def trace_loss(loss_fn: Callable, path, args: Sequence[str] = ("logits", "labels"),
               vocab_size: Optional[int] = None, capture: Optional[str] = None,
               rtol: float = 1e-6, **constants) -> Path:
    """Traces `loss_fn(*tensors, **constants)` (the tensors `args` names, in order) into the
    TorchScript file `path` for `--loss PATH --loss-args <args>`. `vocab_size` sizes the example
    logits (and is passed on when `loss_fn` takes it, as ForCausalLMLoss does); `capture` (a
    maskaudit.capture file) gives its first micro-batch as the example. Raises ValueError when
    the trace, run on a batch of another shape, differs from the callable by more than
    `rtol`: the loss then depends on the shape through Python, and maskaudit would audit a
    different function."""
    import inspect

    import torch

    unknown = [a for a in args if a not in LOSS_ARGS]
    if unknown:
        raise ValueError(f"unknown loss arguments {unknown}: known {', '.join(LOSS_ARGS)}")
    if vocab_size is None:
        raise ValueError("vocab_size is needed to make the example logits")
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs = dict(constants)
    if "vocab_size" in parameters:
        kwargs["vocab_size"] = vocab_size
    # By name where the callable names them all (ForCausalLMLoss takes vocab_size third, before
    # num_items_in_batch), else in order.
    by_name = all(a in parameters for a in args)

    class Traced(torch.nn.Module):
        def forward(self, *tensors):
            if by_name:
                return loss_fn(**dict(zip(args, tensors)), **kwargs)
            return loss_fn(*tensors, **kwargs)

    module = Traced().eval()
    example = _tensors(_example_batch(capture, 3, 12, vocab_size, 0), args, vocab_size, 0)
    traced = torch.jit.trace(module, example, check_trace=False)
    other = _tensors(_example_batch(None, 4, 17, vocab_size, 1), args, vocab_size, 1)
    want, got = module(*other), traced(*other)
    want = want[0] if isinstance(want, (tuple, list)) else want
    got = got[0] if isinstance(got, (tuple, list)) else got
    gap = (got.double() - want.double()).abs().max().item()
    if not gap <= rtol * max(want.double().abs().max().item(), 1e-12):
        raise ValueError(
            f"the traced loss differs from {getattr(loss_fn, '__name__', 'the loss')} by {gap:.3e} "
            f"on a batch of another shape: it depends on the shape through Python")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        traced.save(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
