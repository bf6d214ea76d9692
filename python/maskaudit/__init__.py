"""maskaudit's Python side: capture a real training run for `maskaudit check`.

    import maskaudit
    maskaudit.capture(trainer, "run.parquet", steps=2)   # before trainer.train()
"""

from .capture import CAPTURE_VERSION, ForwardCapture, capture, capture_forward

__all__ = ["CAPTURE_VERSION", "ForwardCapture", "capture", "capture_forward"]
__version__ = "0.1.0"
