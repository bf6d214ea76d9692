#!/usr/bin/env python3
"""The exporter from a checkout, without installing the package: runs
python/maskaudit/export.py (`pip install ./python` gives it as the `maskaudit-export`
command; `make export` runs this file with the set-up's Python)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from maskaudit.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
