"""Fitted linear heads remembered in the cache by everything they depend on: a repeated fit is a read.

    head = fit_head_remembered(x, y, remember=True, kind="logreg", c_grid=C_GRID, seed=0)

`heads.fit_head` is deterministic: the same training features (bytes), labels, head kind, C
grid, fold seed and standardization give the same head (to the last bit on one BLAS setup;
another thread setting, e.g. OMP_NUM_THREADS=1, can move the last bits of the weights and,
rarely, one fold's accuracy: measured on the digits; a remembered head is the first one).
The key is a sha256 of all of them, of the fitting code's SCHEMA and of numpy's and scipy's
versions; the value is the whole
`FittedHead` (weights, standardization, chosen C, CV scores, convergence) in an .npz under
`<cache>/heads/`. A re-run of the same command therefore skips the cross-validation (about 1 s
of a 5-6 s cached re-run of the 1,797 digits), and so does every stage of a repeated stage-probe;
a new head kind, C grid, seed or any changed image fits afresh. Like the feature cache this
is an optimization only: a damaged entry is fitted again and rewritten, an unwritable cache is
said once and skipped, and only the KEEP most recently used heads are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import scipy

from finetune.io import atomic_write, cache_root, cache_write
from finetune.probe.heads import FittedHead, fit_head, say_convergence

log = logging.getLogger(__name__)

SCHEMA = 1  # bump whenever fit_head's result for the same inputs may change
KEEP = 64  # entries kept, the most recently used


def head_key(x: np.ndarray, y: np.ndarray, settings: dict) -> str:
    """sha256 of the training data's bytes and every other argument `fit_head` takes (`settings`)."""
    h = hashlib.sha256()
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    text = json.dumps([SCHEMA, settings, x.shape, np.__version__, scipy.__version__], sort_keys=True)
    h.update(text.encode())
    h.update(memoryview(x).cast("B"))
    h.update(memoryview(y).cast("B"))
    return h.hexdigest()[:40]


def _encode(head: FittedHead) -> bytes:
    cs = sorted(head.cv_scores)
    buf = io.BytesIO()
    np.savez(
        buf,
        kind=np.array(head.kind),
        coef=head.coef,
        intercept=head.intercept,
        mean=head.mean,
        scale=head.scale,
        C=np.array(head.C),
        cv_c=np.array(cs, dtype=np.float64),
        cv_s=np.array([head.cv_scores[c] for c in cs], dtype=np.float64),
        n_folds=np.array(head.n_folds),
        converged=np.array(head.converged),
    )
    return buf.getvalue()


def _decode(blob: bytes, kind: str, width: int) -> FittedHead | None:
    """The stored head, or None when the entry is damaged or is not what the key promised."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            head = FittedHead(
                kind=str(z["kind"]),
                coef=np.asarray(z["coef"], np.float64),
                intercept=np.asarray(z["intercept"], np.float64),
                mean=np.asarray(z["mean"], np.float64),
                scale=np.asarray(z["scale"], np.float64),
                C=float(z["C"]),
                cv_scores={float(c): float(s) for c, s in zip(z["cv_c"], z["cv_s"], strict=True)},
                n_folds=int(z["n_folds"]),
                converged=bool(z["converged"]),
            )
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    parts = (head.coef, head.intercept, head.mean, head.scale)
    shapes_ok = head.coef.ndim == 2 and head.coef.shape[1] == width == len(head.mean) == len(head.scale)
    if head.kind != kind or not shapes_ok or not all(np.isfinite(p).all() for p in parts):
        return None
    return head


def fit_head_remembered(x: np.ndarray, y: np.ndarray, remember: bool = True, **settings) -> FittedHead:
    """`heads.fit_head(x, y, **settings)`, read back from the cache when it was fitted before.

    The key holds every argument of `fit_head`, defaults included (read from its signature, so
    a parameter added there is part of the key without a change here).
    """
    if not remember:
        return fit_head(x, y, **settings)
    bound = inspect.signature(fit_head).bind(x, y, **settings)
    bound.apply_defaults()
    args = {
        k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items() if k not in ("x", "y")
    }
    path = cache_root() / "heads" / f"{head_key(x, y, args)}.npz"
    try:
        head = _decode(path.read_bytes(), args["kind"], np.shape(x)[1])
    except OSError:  # not fitted before (or unreadable): fit
        head = None
    if head is not None:
        log.debug(f"head: the {head.kind} head fitted before on these features, read from {path}")
        _used(path)
        say_convergence(head, len(x))
        return head
    head = fit_head(x, y, **settings)
    blob = _encode(head)
    if cache_write(cache_root(), lambda: atomic_write(path, lambda fh: fh.write(blob))):
        _used(path)
        _evict(path.parent)
    return head


def _used(path: Path) -> None:
    """Mark an entry used now, to the nanosecond (the kernel's own file times are coarser)."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


def _evict(folder: Path) -> None:
    """Delete all but the KEEP most recently used entries (a 1,000-class head is 16 MB)."""
    entries = []
    for p in folder.glob("*.npz"):
        with contextlib.suppress(OSError):  # another process may evict it meanwhile
            entries.append((p.stat().st_mtime_ns, p))
    for _, p in sorted(entries, reverse=True)[KEEP:]:
        with contextlib.suppress(OSError):
            p.unlink()
