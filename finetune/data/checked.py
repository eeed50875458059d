"""Which image files already passed the header check, remembered by file identity in the cache.

    checked = CheckedHeaders(root, remember=True)   # reads <cache>/checked/<root digest>.json
    checked.probe(path)                             # decode.probe, unless this very file passed before
    checked.save()                                  # the files that passed in this scan

A scan opens every image's header; on a re-scan of an unchanged folder that is most of the
time it takes (the 1,797 digit PNGs: 0.39-0.51 s to scan checking every header, 0.12-0.18 s
with the memo). A file is known by
`io.file_key` (path, size, mtime, ctime, inode), so an image rewritten in place, even to the
same size and mtime, is checked again. The memo is also keyed by Pillow's version and its
pixel limit, which decide what passes. Only passes are remembered: a file that failed is
checked (and its reason said) every time. Like the feature cache this is an optimization:
a damaged memo is ignored and rewritten, one that cannot be written is said once and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import PIL
from PIL import Image

from finetune.data.decode import probe
from finetune.io import cache_root, cache_write, file_key, write_json

SCHEMA = 1  # bump when what passing the header check means changes (decode.read_header's rules)


def _memo_path(root: Path) -> Path:
    ident = [SCHEMA, os.fsencode(os.path.abspath(root)).hex(), PIL.__version__, Image.MAX_IMAGE_PIXELS]
    return cache_root() / "checked" / f"{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]}.json"


def _load(path: Path) -> set[str]:
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))["passed"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: check everything
        return set()
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


class CheckedHeaders:
    """`probe` with a memory of the files (by identity) whose header passed in an earlier scan."""

    def __init__(self, root: Path, remember: bool) -> None:
        self.path = _memo_path(root) if remember else None
        self.known = _load(self.path) if self.path is not None else set()
        self.passed: set[str] = set()

    def probe(self, path: str | os.PathLike) -> None:
        """Raise `decode.ImageError` for a file that is not a usable image, as `decode.probe` does."""
        key = file_key(path)  # taken before the check: a file changed after it gets a new key
        if key is None or key not in self.known:
            probe(path)
        if key is not None:
            self.passed.add(key)

    def save(self) -> None:
        """Remember this scan's passes (only these: files gone or changed are forgotten)."""
        if self.path is None or self.passed == self.known:
            return
        path, passed = self.path, sorted(self.passed)
        cache_write(cache_root(), lambda: write_json(path, {"schema": SCHEMA, "passed": passed}))
