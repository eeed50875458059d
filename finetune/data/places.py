"""Where finetune may write: never inside the user's data folder, and only where it can.

    out = outside_data("runs", "mydata", flag="-o")   # refuses ./mydata/runs (and `cd mydata; -o runs`)
    writable_place(out, flag="-o")                    # refuses a file, /proc/x, a read-only folder

Both run before any work, so a mistake costs no extraction and leaves nothing behind. Neither
leaves anything: the folder is made by whoever writes into it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from finetune.errors import DataError, FinetuneError


def outside_data(out: str | os.PathLike, data_root: str | os.PathLike, flag: str = "-o") -> Path:
    """`out`, refused when it is DATA or inside it (symlinks resolved); the error names a place that works.

    A run folder inside DATA would be scanned as a class by the next run (its `curves.png`
    an image of class "runs"), and finetune promises never to write there.
    """
    out_path = Path(out).expanduser()
    root = Path(data_root).expanduser().resolve()
    resolved = out_path.resolve()
    if resolved == root or root in resolved.parents:
        suggestion = root.parent / f"{root.name or 'data'}-runs"
        raise DataError(
            f"output folder {out_path} is inside the data folder {root}, which finetune never writes to",
            f"pass {flag} a folder outside it, e.g. {flag} {suggestion}",
        )
    return out_path


def writable_place(out: str | os.PathLike, flag: str = "-o") -> Path:
    """`out` if a folder can be made there (or is one) and written to; nothing is left behind.

    Walks up to the first part of the path that exists: it must be a folder this process can
    write into (an existing `out` must be a writable folder). Only a nameless temporary file is
    made there, and gone at once.
    """
    out_path = Path(out).expanduser()
    if "\0" in str(out_path):
        raise FinetuneError(f"{flag} {out_path!r} is not a valid path", f"pass {flag} a folder name")
    probe = out_path.absolute()
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FinetuneError(
            f"cannot write under {flag} {out_path}: {probe} is a file, not a folder",
            f"pass {flag} a folder",
        )
    try:  # os.access says yes to root on /proc and on read-only mounts: try it (the file goes at once)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise FinetuneError(
            f"cannot write under {flag} {out_path}: {probe} is not writable ({err.strerror})",
            f"pass {flag} a folder you can write to",
        ) from None
    return out_path
