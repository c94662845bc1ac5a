"""Where tokenized data and built-in models live between runs."""

import os
from pathlib import Path
from typing import Optional


def cache_root(configured: Optional[str]) -> Path:
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sft-launcher"
