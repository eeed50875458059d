"""The feature cache: rows keyed by what they depend on, so a re-run computes nothing twice.

    ident = FeatureIdentity.of(backbone, tap="pool", pool="avg", preprocessing=pre)
    cache = FeatureCache(ident)
    cache.lookup([file_key(path), ...])     # {i: feature row}  (finetune.io.file_key)

The network (model, weights sha256, tap, pooling, preprocessing, decoder, library versions and
the extraction code's SCHEMA) names a folder, and the file (absolute path, size, st_mtime_ns,
st_ctime_ns, inode) names the row: change one image, even to the same size and mtime, and only
it is re-extracted. Shards are written atomically and never rewritten, so a crash leaves a
usable cache; a shard that is damaged anyway (bad JSON, fewer rows than keys, the wrong width,
rows that are not finite) is discarded and its images extracted again. The cache is an
optimization only: when it cannot be written (read-only, full, FINETUNE_CACHE naming a file)
the command says so in one line and goes on without it. The cut network's tensors
(`trunk_tensors`) are cached beside the features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from finetune.data.transforms import Preprocessing
from finetune.io import cache_root, cache_write

log = logging.getLogger(__name__)

# Bump whenever what a cached row means changes (extraction, pooling, tap semantics, key format):
# every identity changes with it, so old rows are never read as new ones.
SCHEMA = 2


@dataclass(frozen=True)
class FeatureIdentity:
    """Everything a feature vector depends on, apart from the image file itself."""

    model: str
    weights_sha256: str
    tap: str
    pool: str
    preprocessing: tuple  # Preprocessing as a sorted tuple of items
    versions: tuple  # (name, version) of torch, torchvision, timm, pillow
    decoder: str = ""  # which decoder made the pixels (data.decode.DECODERS)
    schema: int = SCHEMA  # the extraction code's own version

    @classmethod
    def of(cls, backbone, tap: str, pool: str, preprocessing: Preprocessing) -> FeatureIdentity | None:
        """None when the weights have no fingerprint (random init): such features are not cached."""
        return cls.of_parts(backbone.spec.model, backbone.weights.sha256, tap, pool, preprocessing)

    @classmethod
    def of_parts(
        cls, model: str, weights_sha256: str | None, tap: str, pool: str, preprocessing: Preprocessing
    ) -> FeatureIdentity | None:
        """The identity from its parts, e.g. a run's config.json (no network built)."""
        from finetune.data.decode import get_decoder
        from finetune.io import versions

        if not weights_sha256:
            return None
        v = versions()
        libs = tuple((k, v.get(k, "")) for k in ("torch", "torchvision", "timm", "pillow"))
        pre = tuple(sorted((k, json.dumps(val)) for k, val in preprocessing.to_dict().items()))
        return cls(model, weights_sha256, tap, pool, pre, libs, get_decoder().name)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    @property
    def trunk_digest(self) -> str:
        """What the cut network's tensors depend on: not the pixels' preprocessing or decoder."""
        key = [self.model, self.weights_sha256, self.tap, self.pool, self.versions]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


class FeatureCache:
    """Append-only shards of features for one FeatureIdentity: `<digest>/<id>.npy` + `<id>.json`.

    `<id>.json` holds {"width": D, "keys": [...]}, one key per row of the (rows, D) `.npy`.
    Files that passed the header check but failed to decode are remembered too
    (`<id>.failed.json`: {key: reason}): the failure belongs to those exact bytes (the key
    changes with them), so a re-run of a messy folder skips them without running the network.
    """

    FAILED = ".failed.json"

    def __init__(self, identity: FeatureIdentity, root: Path | None = None) -> None:
        self.identity = identity
        self.root = root or cache_root()
        self.dir = self.root / "features" / identity.digest
        self._index: dict[str, tuple[str, int]] | None = None
        self._failed: dict[str, str] | None = None

    def _discard(self, shard: str, why: str) -> None:
        """A damaged shard is never used again: removed (best effort), its images re-extracted."""
        log.info(f"feature cache: discarding damaged shard {shard} ({why}); its images are extracted again")
        for suffix in (".json", ".npy"):
            with contextlib.suppress(OSError):
                (self.dir / f"{shard}{suffix}").unlink()

    def _load_index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            self._index = {}
            shards = valid_shards(self.dir, self._discard)
            for shard, keys in shards.items():
                for row, key in enumerate(keys):
                    self._index[key] = (shard, row)
        return self._index

    def lookup(self, keys: Sequence[str | None]) -> dict[int, np.ndarray]:
        """{i: feature row} for each keys[i] found with finite values (None keys are never found)."""
        index = self._load_index()
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            if key is not None and key in index:
                shard, row = index[key]
                by_shard.setdefault(shard, []).append((i, row))
        out: dict[int, np.ndarray] = {}
        for shard, pairs in by_shard.items():
            try:
                arr = np.load(self.dir / f"{shard}.npy", mmap_mode="r", allow_pickle=False)
                rows = np.asarray([r for _, r in pairs])
                block = np.asarray(arr[rows], dtype=np.float32)  # (n, D)
            except (OSError, ValueError, IndexError):
                self._forget(shard, "unreadable")
                continue
            if not np.isfinite(block).all():
                self._forget(shard, "rows that are not finite numbers")
                continue
            for (i, _), vec in zip(pairs, block):
                out[i] = vec
        return out

    def _forget(self, shard: str, why: str) -> None:
        self._discard(shard, why)
        index = self._load_index()
        for key in [k for k, (s, _) in index.items() if s == shard]:
            del index[key]

    def failures(self, keys: Sequence[str | None]) -> dict[int, str]:
        """{i: reason} for each keys[i] that failed to decode before."""
        if self._failed is None:
            self._failed = {}
            for path in sorted(self.dir.glob(f"*{self.FAILED}")) if self.dir.is_dir() else []:
                try:
                    record = json.loads(path.read_text())
                    if isinstance(record, dict):
                        self._failed.update({str(k): str(v) for k, v in record.items()})
                except (OSError, ValueError):
                    continue  # a damaged record: those files are simply tried again
        return {i: self._failed[k] for i, k in enumerate(keys) if k is not None and k in self._failed}

    def store_failures(self, reasons: dict[str, str]) -> None:
        """Remember decode failures, {key: reason}."""
        from finetune.io import write_json

        if reasons and cache_write(
            self.root, lambda: write_json(self.dir / f"{self._new_shard()}{self.FAILED}", reasons)
        ):
            self.failures([])  # loaded, so the update below is not lost
            self._failed.update(reasons)

    def _new_shard(self) -> str:
        from finetune.io import write_json

        self.dir.mkdir(parents=True, exist_ok=True)
        ident = self.dir / "identity.json"
        if not ident.exists():
            write_json(ident, asdict(self.identity))
        return f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"

    def store(self, keys: Sequence[str], x: np.ndarray) -> None:
        """Add one shard of (len(keys), D) rows; the .npy is complete on disk before the .json
        that makes it visible. A cache that cannot be written is reported once and skipped."""
        from finetune.io import atomic_write, write_json

        if not len(keys):
            return
        x = np.ascontiguousarray(x, np.float32)  # (N, D)
        shard = ""

        def write() -> None:
            nonlocal shard
            shard = self._new_shard()
            atomic_write(self.dir / f"{shard}.npy", lambda fh: np.save(fh, x))
            write_json(self.dir / f"{shard}.json", {"width": int(x.shape[1]), "keys": list(keys)})

        if not cache_write(self.root, write):
            return
        index = self._load_index()
        for row, key in enumerate(keys):
            index[key] = (shard, row)


def _shard_keys(meta: Path) -> tuple[list[str], int] | str:
    """(keys, width) of a shard whose .json and .npy agree, or why it is damaged."""
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return "its key list is not valid JSON"
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("keys"), list)
        or not all(isinstance(k, str) for k in record["keys"])
        or not isinstance(record.get("width"), int)
    ):
        return "its key list is malformed"
    try:
        arr = np.load(meta.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return "its features are unreadable"
    keys, width = record["keys"], record["width"]
    if arr.ndim != 2 or arr.shape[1] != width:
        return f"features of shape {arr.shape}, not (rows, {width})"
    if arr.shape[0] != len(keys):
        return f"{arr.shape[0]} rows for {len(keys)} keys"
    return keys, width


def valid_shards(folder: Path, discard: Callable[[str, str], None] | None = None) -> dict[str, list[str]]:
    """{shard id: keys} of the shards of one feature folder that are intact and of the common width.

    A shard whose features are still being written (a .npy without its .json) is not listed; a
    damaged one is passed to `discard(shard, why)`.
    """
    found: dict[str, tuple[list[str], int]] = {}
    if not folder.is_dir():
        return {}
    for meta in sorted(folder.glob("*.json")):
        if meta.name == "identity.json" or meta.name.endswith(FeatureCache.FAILED):
            continue
        if not meta.with_suffix(".npy").is_file():
            continue
        got = _shard_keys(meta)
        if isinstance(got, str):
            if discard is not None:
                discard(meta.stem, got)
            continue
        found[meta.stem] = got
    rows_by_width: dict[int, int] = {}
    for keys, width in found.values():
        rows_by_width[width] = rows_by_width.get(width, 0) + len(keys)
    common = max(rows_by_width, key=lambda w: rows_by_width[w], default=None)  # ties: the first written
    out = {}
    for shard, (keys, width) in found.items():
        if width == common:
            out[shard] = keys
        elif discard is not None:
            discard(shard, f"width {width}, the other shards' is {common}")
    return out


def cache_info(root: Path | None = None) -> list[dict]:
    """One row per cached feature set: model, weights sha256, input size, decoder, tap, images, bytes."""
    base = (root or cache_root()) / "features"
    rows = []
    if base.is_dir():
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            try:
                ident = json.loads((d / "identity.json").read_text())
            except (OSError, ValueError):
                ident = {}
            ident = ident if isinstance(ident, dict) else {}
            keys = sum(len(k) for k in valid_shards(d).values())
            size = _bytes(d)
            try:
                pre = dict(ident.get("preprocessing") or [])  # (key, JSON text) pairs
            except (TypeError, ValueError):
                pre = {}
            rows.append(
                {
                    "id": d.name,
                    "model": ident.get("model", "?"),
                    "weights": str(ident.get("weights_sha256", "?"))[:12],
                    "input_size": _json_or_none(pre.get("input_size")),
                    "decoder": ident.get("decoder", "?"),
                    "tap": ident.get("tap", "?"),
                    "pool": ident.get("pool", "?"),
                    "rows": keys,
                    "bytes": size,
                }
            )
    return rows


# What the cache holds besides features: {folder: what one file of it is}.
CACHE_PARTS = {
    "engines": "exported engines",
    "trunks": "cut networks",
    "backbones": "backbone cards",
    "heads": "fitted heads",
    "checked": "checked image headers",
}
KEPT_PARTS = {"datasets": "demo datasets"}  # listed by cache info, kept by cache clear


def cache_parts(root: Path | None = None) -> dict[str, dict]:
    """{folder: {"what", "files", "bytes", "kept"}}: each part of CACHE_PARTS; datasets (kept)."""
    out = {}
    for sub, what in {**CACHE_PARTS, **KEPT_PARTS}.items():
        d = (root or cache_root()) / sub
        files = [f for f in d.rglob("*") if f.is_file()] if d.is_dir() else []
        out[sub] = {"what": what, "files": len(files), "bytes": _bytes(d), "kept": sub in KEPT_PARTS}
    return out


def _json_or_none(text) -> object:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _bytes(folder: Path) -> int:
    """Bytes of the files under `folder`; files that vanish meanwhile (a run, a clear) count 0."""
    total = 0
    if folder.is_dir():
        for f in folder.rglob("*"):
            with contextlib.suppress(OSError):
                total += f.stat().st_size if f.is_file() else 0
    return total


def cache_clear(root: Path | None = None) -> int:
    """Remove cached features and every part of CACHE_PARTS (engines, cut networks, cards, fitted
    heads, checked headers); returns bytes freed."""
    import shutil

    freed = 0
    for sub in ("features", *CACHE_PARTS):
        d = (root or cache_root()) / sub
        if d.is_dir():
            freed += _bytes(d)
            # A run writing meanwhile may add or rename files: whatever is gone is gone, and a
            # shard written half-way through is only ever visible once complete.
            for _ in range(3):
                shutil.rmtree(d, ignore_errors=True)
                if not d.exists():
                    break
    return freed


def trunk_tensors(backbone, tap: str, pool: str, preprocessing: Preprocessing, cache: bool = True) -> dict:
    """The tensors of `backbone` cut at `tap`, named as in the saved model ("trunk.<name>"), as numpy.

    Cached next to the features (`trunks/<digest>.safetensors`), so a probe whose features all
    come from the cache writes its model without building the network, and without torch.
    Building cuts `backbone.model` in place: call this after the last use of the full network.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save

    from finetune.io import atomic_write

    ident = FeatureIdentity.of(backbone, tap, pool, preprocessing) if cache else None
    path = cache_root() / "trunks" / f"{ident.trunk_digest}.safetensors" if ident else None
    if path is not None and path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            pass  # a damaged file is rebuilt and replaced
    from finetune.models.anatomy import build_trunk

    trunk = build_trunk(backbone.model, tap, pool)
    tensors = {f"trunk.{k}": v.detach().cpu().contiguous().numpy() for k, v in trunk.state_dict().items()}
    if path is not None:
        blob = save(tensors)
        cache_write(cache_root(), lambda: atomic_write(path, lambda fh: fh.write(blob)))
    return tensors
