"""The feature cache: rows keyed by what they depend on, so a re-run computes nothing twice.

    ident = FeatureIdentity.of(backbone, tap="pool", pool="avg", preprocessing=pre)
    cache = FeatureCache(ident)
    cache.lookup([file_key(path), ...])     # {i: feature row}

The network (model, weights sha256, tap, pooling, preprocessing, decoder, library versions)
names a folder, and the file (absolute path, size, st_mtime_ns, inode) names the row. Change
one image and only it is re-extracted. Shards are written atomically and never rewritten, so a
crash leaves a usable cache. The cut network's tensors (`trunk_tensors`) are cached beside them.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.transforms import Preprocessing
from finetune.io import cache_root

if TYPE_CHECKING:  # torch is imported where a network runs: a fully cached probe never imports it
    pass


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
    """Append-only shards of features for one FeatureIdentity: `<digest>/<id>.npy` + `<id>.json` (keys).

    Files that passed the header check but failed to decode are remembered too
    (`<id>.failed.json`: {key: reason}): the failure belongs to those exact bytes (the key
    changes with them), so a re-run of a messy folder skips them without running the network.
    """

    FAILED = ".failed.json"

    def __init__(self, identity: FeatureIdentity, root: Path | None = None) -> None:
        self.identity = identity
        self.dir = (root or cache_root()) / "features" / identity.digest
        self._index: dict[str, tuple[str, int]] | None = None
        self._failed: dict[str, str] | None = None

    def _load_index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            self._index = {}
            if self.dir.is_dir():
                for meta in sorted(self.dir.glob("*.json")):
                    if meta.name == "identity.json" or meta.name.endswith(self.FAILED):
                        continue
                    if not meta.with_suffix(".npy").is_file():
                        continue
                    try:
                        keys = json.loads(meta.read_text())
                    except (OSError, json.JSONDecodeError):
                        continue  # a damaged shard is simply not used
                    for row, key in enumerate(keys):
                        self._index[key] = (meta.stem, row)
        return self._index

    def lookup(self, keys: Sequence[str]) -> dict[int, np.ndarray]:
        """{i: feature row} for each keys[i] found."""
        index = self._load_index()
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            if key in index:
                shard, row = index[key]
                by_shard.setdefault(shard, []).append((i, row))
        out: dict[int, np.ndarray] = {}
        for shard, pairs in by_shard.items():
            try:
                arr = np.load(self.dir / f"{shard}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                continue
            rows = np.asarray([r for _, r in pairs])
            block = np.asarray(arr[rows], dtype=np.float32)
            for (i, _), vec in zip(pairs, block):
                out[i] = vec
        return out

    def failures(self, keys: Sequence[str]) -> dict[int, str]:
        """{i: reason} for each keys[i] that failed to decode before."""
        if self._failed is None:
            self._failed = {}
            for path in sorted(self.dir.glob(f"*{self.FAILED}")) if self.dir.is_dir() else []:
                try:
                    self._failed.update(json.loads(path.read_text()))
                except (OSError, json.JSONDecodeError, TypeError, ValueError):
                    continue  # a damaged record: those files are simply tried again
        return {i: self._failed[k] for i, k in enumerate(keys) if k in self._failed}

    def store_failures(self, reasons: dict[str, str]) -> None:
        """Remember decode failures, {key: reason}."""
        from finetune.io import write_json

        if reasons:
            write_json(self.dir / f"{self._new_shard()}{self.FAILED}", reasons)
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
        """Add one shard; the .npy is complete on disk before the .json that makes it visible."""
        from finetune.io import atomic_write, write_json

        if not len(keys):
            return
        shard = self._new_shard()
        atomic_write(self.dir / f"{shard}.npy", lambda fh: np.save(fh, np.ascontiguousarray(x, np.float32)))
        write_json(self.dir / f"{shard}.json", list(keys))
        index = self._load_index()
        for row, key in enumerate(keys):
            index[key] = (shard, row)


def cache_info(root: Path | None = None) -> list[dict]:
    """One row per cached feature set: model, weights sha256, input size, decoder, tap, images, bytes."""
    base = (root or cache_root()) / "features"
    rows = []
    if base.is_dir():
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            try:
                ident = json.loads((d / "identity.json").read_text())
            except (OSError, json.JSONDecodeError):
                ident = {}
            shards = [m for m in d.glob("*.json") if m.with_suffix(".npy").is_file()]
            keys = sum(len(json.loads(m.read_text())) for m in shards)
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            pre = dict(ident.get("preprocessing") or [])  # (key, JSON text) pairs
            rows.append(
                {
                    "id": d.name,
                    "model": ident.get("model", "?"),
                    "weights": str(ident.get("weights_sha256", "?"))[:12],
                    "input_size": json.loads(pre.get("input_size", "null")),
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
}
KEPT_PARTS = {"datasets": "demo datasets"}  # listed by cache info, kept by cache clear


def cache_parts(root: Path | None = None) -> dict[str, dict]:
    """{folder: {"what", "files", "bytes", "kept"}}: engines, cut networks, cards; datasets (kept)."""
    out = {}
    for sub, what in {**CACHE_PARTS, **KEPT_PARTS}.items():
        d = (root or cache_root()) / sub
        files = [f for f in d.rglob("*") if f.is_file()] if d.is_dir() else []
        size = sum(f.stat().st_size for f in files)
        out[sub] = {"what": what, "files": len(files), "bytes": size, "kept": sub in KEPT_PARTS}
    return out


def cache_clear(root: Path | None = None) -> int:
    """Remove cached features, exported engines, cut networks and backbone cards; returns bytes freed."""
    import shutil

    freed = 0
    for sub in ("features", *CACHE_PARTS):
        d = (root or cache_root()) / sub
        if d.is_dir():
            freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d)
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
        except (SafetensorError, OSError):
            pass  # a damaged file is rebuilt and replaced
    from finetune.models.anatomy import build_trunk

    trunk = build_trunk(backbone.model, tap, pool)
    tensors = {f"trunk.{k}": v.detach().cpu().contiguous().numpy() for k, v in trunk.state_dict().items()}
    if path is not None:
        blob = save(tensors)
        atomic_write(path, lambda fh: fh.write(blob))
    return tensors
