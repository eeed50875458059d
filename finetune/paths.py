"""Where finetune keeps its own files (never inside the user's data folder).

cache_root()   # $FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("FINETUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune"
