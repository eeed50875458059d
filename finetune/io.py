"""Files finetune writes, and where: atomic writes, JSON, tensors, sha256, file identity, cache root.

    atomic_write(path, lambda fh: fh.write(blob))   # the old file or the complete new one, never half
    write_json(path, obj); save_tensors(path, {"w": w}, metadata={...})
    sha256_file(path); versions(); cache_root()       # $FINETUNE_CACHE, else ~/.cache/finetune
    file_key(path)                                    # a file's identity from stat, not its bytes
    cache_writable(); cache_write(root, fn)           # a cache that cannot be written: one line, go on

Everything below the CLI writes through these, so a crash, a `kill -9` or a full disk never
leaves a half-written file behind. Nothing here knows about runs, features or models.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread starts
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file so it is either the old one or the complete new one, never half of each.

    `write(fh)` fills a temp file in the same folder; it is fsynced, renamed over `path`,
    and the folder entry fsynced. On any error (a full disk: OSError ENOSPC) the temp file is
    removed and the old file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=True, default=_json_default) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors, atomically, from torch tensors or numpy arrays (the same file either way).

    Torch tensors are made contiguous, detached, CPU and unshared first (safetensors refuses
    channels_last and shared storage); all-numpy dicts are written without importing torch.
    """
    import numpy as np

    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save as save_numpy

        blob = save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    else:
        from safetensors.torch import save

        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        blob = save(plain, metadata=metadata)
    atomic_write(path, lambda fh: fh.write(blob))


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    import importlib.metadata as md

    out = []
    for pkg in ("finetune", "torch", "torchvision", "timm", "pillow", "scikit-learn", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out.append((pkg, md.version(pkg)))
    return tuple(out)


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the numbers (read once per process)."""
    return dict(_versions())


def cache_root() -> Path:
    env = os.environ.get("FINETUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_key(path: str | os.PathLike) -> str | None:
    """Identity of one file's current bytes, without reading them; None when it is gone.

    Absolute path, size, st_mtime_ns, st_ctime_ns and inode: a rewrite in place that keeps the
    size and restores the mtime still changes the ctime, which no user can set.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    text = (
        f"{os.fsencode(os.path.abspath(path))!r}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    )
    return hashlib.sha1(text.encode()).hexdigest()


_UNWRITABLE: set[str] = set()  # cache roots already reported as unwritable (one line per process)


def _cannot_write(root: Path, err: OSError | str) -> None:
    """Say once that the cache at `root` cannot be written; later writes there are skipped."""
    key = str(root)
    if key in _UNWRITABLE:
        return
    _UNWRITABLE.add(key)
    why = err if isinstance(err, str) else (err.strerror or type(err).__name__)
    log.warning(f"cache {root} cannot be written ({why}): going on without it")


def cache_writable(root: Path | None = None) -> bool:
    """True when the cache folder exists or can be made, and takes a file; else one line, False.

    Commands ask once at the start and run without the cache when it is False (a read-only or
    full cache, or FINETUNE_CACHE naming a file).
    """
    root = root or cache_root()
    if str(root) in _UNWRITABLE:
        return False
    if root.exists() and not root.is_dir():
        _cannot_write(root, "it is a file, not a folder")
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        _cannot_write(root, err)
        return False
    return True


def cache_write(root: Path, write: Callable[[], None]) -> bool:
    """Run one cache write; a full or read-only cache is reported once and skipped, never fatal."""
    if str(root) in _UNWRITABLE:
        return False
    try:
        write()
    except OSError as err:
        _cannot_write(root, err)
        return False
    return True
