"""maskaudit's Python side: capture a real training run for `maskaudit check`, trace a
Python loss for `--loss`, and (as the `maskaudit-export` command, `maskaudit.export`) export a
Hugging Face model.

    import maskaudit
    maskaudit.capture(trainer, "run.parquet", steps=1)   # before trainer.train()
    maskaudit.trace_loss(loss_fn, "loss.pt", args=("logits", "labels"), vocab_size=V)
"""

from .capture import CAPTURE_VERSION, ForwardCapture, capture, capture_forward
from .loss import trace_loss

__all__ = ["CAPTURE_VERSION", "ForwardCapture", "capture", "capture_forward", "trace_loss"]
__version__ = "0.1.0"
