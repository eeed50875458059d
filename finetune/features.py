"""Run a frozen trunk over images, collect pooled features, and cache them per image.

    ident = FeatureIdentity.of(backbone, tap="pool", pool="avg", preprocessing=pre)
    feats = extract(trunk, index, positions, pre, identity=ident, cache=True)
    feats.x          # (N, D) float32, rows in the order of feats.positions
    feats.bad        # {position: reason} for files that failed to decode (skipped, reported)
    feats.hits       # how many rows came from the cache

The trunk runs in inference mode, batched, channels_last, on the fastest engine for the
device (`engine.py`), while DataLoader workers decode and resize the next batches.

The cache keys every row by what the feature depends on: the network (model, weights
sha256, tap, pooling, preprocessing, library versions) names a folder, and the file (absolute
path, size, st_mtime_ns, inode) names the row. Change one image and only it is re-extracted.
Shards are written atomically and never rewritten, so a crash leaves a usable cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.data import DatasetIndex, ImageDataset, Preprocessing, default_workers, eval_reader, make_loader
from finetune.paths import cache_root
from finetune.progress import progress_bar

if TYPE_CHECKING:  # torch is imported where a network runs: a fully cached probe never imports it
    import torch
    from torch import nn


@dataclass
class Features:
    """Features of some positions of a DatasetIndex."""

    x: np.ndarray  # (N, D) float32
    positions: np.ndarray  # (N,) int64 positions into the index
    labels: np.ndarray  # (N,) int64
    bad: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the extraction phase
    hits: int = 0  # rows served from the cache
    engine: str = ""
    shape: tuple[int, ...] = ()  # one row's shape before flattening: (D,) pooled, (C, H, W) unpooled

    def subset(self, positions: Sequence[int]) -> Features:
        """Rows for `positions` (those that decoded), in that order."""
        where = {int(p): r for r, p in enumerate(self.positions)}
        rows = [where[int(p)] for p in positions if int(p) in where]
        return Features(self.x[rows], self.positions[rows], self.labels[rows])


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else as given."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- identity and cache


@dataclass(frozen=True)
class FeatureIdentity:
    """Everything a feature vector depends on, apart from the image file itself."""

    model: str
    weights_sha256: str
    tap: str
    pool: str
    preprocessing: tuple  # Preprocessing as a sorted tuple of items
    versions: tuple  # (name, version) of torch, torchvision, timm, pillow
    decoder: str = ""  # which decoder made the pixels (data.DECODERS)

    @classmethod
    def of(cls, backbone, tap: str, pool: str, preprocessing: Preprocessing) -> FeatureIdentity | None:
        """None when the weights have no fingerprint (random init): such features are not cached."""
        return cls.of_parts(backbone.spec.model, backbone.weights.sha256, tap, pool, preprocessing)

    @classmethod
    def of_parts(
        cls, model: str, weights_sha256: str | None, tap: str, pool: str, preprocessing: Preprocessing
    ) -> FeatureIdentity | None:
        """The identity from its parts, e.g. a run's config.json (no network built)."""
        from finetune.data import get_decoder
        from finetune.runs import versions

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


def file_key(path: Path) -> str:
    """Identity of one file's current bytes, without reading them: path, size, mtime_ns, inode."""
    st = os.stat(path)
    text = f"{os.fsencode(os.path.abspath(path))!r}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    return hashlib.sha1(text.encode()).hexdigest()


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
        from finetune.runs import write_json

        if reasons:
            write_json(self.dir / f"{self._new_shard()}{self.FAILED}", reasons)
            self.failures([])  # loaded, so the update below is not lost
            self._failed.update(reasons)

    def _new_shard(self) -> str:
        from finetune.runs import write_json

        self.dir.mkdir(parents=True, exist_ok=True)
        ident = self.dir / "identity.json"
        if not ident.exists():
            write_json(ident, asdict(self.identity))
        return f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"

    def store(self, keys: Sequence[str], x: np.ndarray) -> None:
        """Add one shard; the .npy is complete on disk before the .json that makes it visible."""
        from finetune.runs import atomic_write, write_json

        if not len(keys):
            return
        shard = self._new_shard()
        atomic_write(self.dir / f"{shard}.npy", lambda fh: np.save(fh, np.ascontiguousarray(x, np.float32)))
        write_json(self.dir / f"{shard}.json", list(keys))
        index = self._load_index()
        for row, key in enumerate(keys):
            index[key] = (shard, row)


def cache_info(root: Path | None = None) -> list[dict]:
    """One row per cached feature set: model, tap, images, size on disk."""
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
            rows.append(
                {
                    "id": d.name,
                    "model": ident.get("model", "?"),
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


def cache_parts(root: Path | None = None) -> dict[str, dict]:
    """{folder: {"what", "files", "bytes"}} for the engines, cut networks and backbone cards."""
    out = {}
    for sub, what in CACHE_PARTS.items():
        d = (root or cache_root()) / sub
        files = [f for f in d.rglob("*") if f.is_file()] if d.is_dir() else []
        out[sub] = {"what": what, "files": len(files), "bytes": sum(f.stat().st_size for f in files)}
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

    from finetune.runs import atomic_write

    ident = FeatureIdentity.of(backbone, tap, pool, preprocessing) if cache else None
    path = cache_root() / "trunks" / f"{ident.trunk_digest}.safetensors" if ident else None
    if path is not None and path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError):
            pass  # a damaged file is rebuilt and replaced
    from finetune.anatomy import build_trunk

    trunk = build_trunk(backbone.model, tap, pool)
    tensors = {f"trunk.{k}": v.detach().cpu().contiguous().numpy() for k, v in trunk.state_dict().items()}
    if path is not None:
        blob = save(tensors)
        atomic_write(path, lambda fh: fh.write(blob))
    return tensors


# --------------------------------------------------------------------------- extraction


def _run_engine(
    engine,
    index: DatasetIndex,
    positions: Sequence[int],
    preprocessing: Preprocessing,
    batch_size: int,
    workers: int,
    description: str,
):
    dataset = ImageDataset(index, positions, read=eval_reader(preprocessing))  # fast decoder by default
    loader = make_loader(dataset, batch_size, min(workers, max(0, len(dataset) // batch_size)))
    xs: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    bad: dict[int, str] = {}
    with progress_bar(description, total=len(dataset), unit="img") as bar:
        for x, _, p, failed in loader:
            bad.update(failed)
            if x is not None:
                xs.append(engine(x).numpy())  # (B, D)
                pos.append(p.numpy())
            bar.advance(len(failed) + (0 if x is None else len(x)))
    x_all = np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)
    p_all = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    return x_all.astype(np.float32, copy=False), p_all.astype(np.int64), bad


# --------------------------------------------------------------------------- under torchrun


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _shard(todo: list[int]) -> tuple[list[int], int]:
    """This rank's share of the images (every world-th one), and the world size (1 alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return todo, 1
    return todo[dist.get_rank() :: dist.get_world_size()], dist.get_world_size()


def _all_gather_bytes(blob: bytes) -> list[bytes]:
    """Every rank's bytes, in rank order, as uint8 tensors (no pickled objects; gloo and nccl)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(int(t) for t in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else buf[:0]
    parts = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return [bytes(part[: int(n)].cpu().numpy()) for part, n in zip(parts, sizes)]


def _gather(
    x: np.ndarray, p: np.ndarray, bad: dict[int, str]
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Every rank's rows on every rank; rows are keyed by position, so the original order is kept."""
    import io

    out = io.BytesIO()
    np.savez(
        out, x=x, p=p, bad_pos=np.asarray(list(bad), np.int64), bad_why=np.asarray(list(bad.values()), str)
    )
    xs, ps, merged = [], [], {}
    for blob in _all_gather_bytes(out.getvalue()):
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            if len(z["p"]):
                xs.append(z["x"])
                ps.append(z["p"])
            merged.update(zip(z["bad_pos"].tolist(), z["bad_why"].tolist()))
    if not xs:
        return x, p, merged
    return np.concatenate(xs), np.concatenate(ps), merged


# --------------------------------------------------------------------------- several taps, one pass


def _tap_shapes(multi, input_size: int) -> list[tuple[int, ...]]:
    import torch

    was = multi.training
    multi.eval()
    with torch.no_grad():
        outs = multi(torch.zeros(1, 3, input_size, input_size))
    multi.train(was)
    return [tuple(o.shape[1:]) for o in outs]


def extract_taps(
    backbone,
    taps: Sequence[str],
    pool: str,
    index: DatasetIndex,
    positions: Sequence[int],
    preprocessing: Preprocessing,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    cache: bool = True,
    log=None,
    description: str = "extracting features",
) -> dict[str, Features]:
    """Features of several taps of `backbone` from one pass over the images, cached per tap.

    Args:
        backbone: a `backbones.Backbone` (its model is not modified).
        taps: tap names (see `anatomy.taps`), in the order wanted.
        pool: "avg" or "max" (pooled (N, D) rows), or "none" (flattened maps; never cached).

    Returns:
        {tap: Features}, every one with the same positions; `Features.shape` of a "none" tap is
        the unpooled (C, H, W).
    """
    taps = list(dict.fromkeys(taps))

    def network() -> nn.Module:
        import copy

        from finetune.anatomy import OneTap, build_multi_trunk, build_trunk

        model = copy.deepcopy(backbone.model)
        # One tap: the plain cut network (cheapest, exports cleanly); several: one pass with hooks.
        if len(taps) == 1:
            return OneTap(build_trunk(model, taps[0], pool))
        return build_multi_trunk(model, taps, pool)

    idents = [FeatureIdentity.of(backbone, t, pool, preprocessing) for t in taps]
    return _extract_outputs(
        network,
        taps,
        idents,
        index,
        positions,
        preprocessing,
        batch_size,
        workers,
        device,
        cache and pool != "none",
        log,
        description,
    )


def extract(
    trunk: nn.Module, index: DatasetIndex, positions: Sequence[int], preprocessing: Preprocessing, **kwargs
) -> Features:
    """Features of any frozen trunk (images (B, 3, H, W) -> (B, D)), e.g. a run's own.

    Keyword arguments as `extract_lazy` (batch_size, workers, device, description, identity, cache, log).
    """
    return extract_lazy(lambda: trunk, index, positions, preprocessing, **kwargs)


def extract_lazy(
    build: Callable[[], nn.Module],
    index: DatasetIndex,
    positions: Sequence[int],
    preprocessing: Preprocessing,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    description: str = "extracting features",
    identity: FeatureIdentity | None = None,
    cache: bool = True,
    log=None,
) -> Features:
    """Features of the frozen network `build()` makes, called only when some image is not cached.

    Args:
        identity: what the features depend on; None disables the cache (and the ONNX engine).
        cache: read and write the feature cache.
    """

    def network() -> nn.Module:
        from finetune.anatomy import OneTap

        return OneTap(build())

    out = _extract_outputs(
        network,
        ["x"],
        [identity],
        index,
        positions,
        preprocessing,
        batch_size,
        workers,
        device,
        cache,
        log,
        description,
    )
    return out["x"]


def _extract_outputs(
    network: Callable[[], nn.Module],
    names: list[str],
    idents: list[FeatureIdentity | None],
    index: DatasetIndex,
    positions: Sequence[int],
    preprocessing: Preprocessing,
    batch_size: int,
    workers: int | None,
    device: str | torch.device,
    cache: bool,
    log,
    description: str,
) -> dict[str, Features]:
    """The one extraction path: cached rows per output, one pass of `network()` for the rest.

    `network()` is built only when some image is missing from the cache; its forward returns
    one tensor per name. Outputs without an identity (random weights) are never cached.
    """
    start = time.perf_counter()
    positions = [int(p) for p in positions]
    fingerprinted = all(i is not None for i in idents)
    use_cache = cache and fingerprinted
    stores = {t: FeatureCache(i) for t, i in zip(names, idents)} if use_cache else {}
    keys = [file_key(index.absolute(p)) for p in positions] if use_cache else []
    found = {t: stores[t].lookup(keys) for t in names} if use_cache else {t: {} for t in names}
    failed = {t: stores[t].failures(keys) for t in names} if use_cache else {t: {} for t in names}
    todo = [
        p for i, p in enumerate(positions) if any(i not in found[t] and i not in failed[t] for t in names)
    ]
    pending = set(todo)
    # known failures of the files not tried again, as the extraction would report them
    bad: dict[int, str] = {
        positions[i]: why for t in names for i, why in failed[t].items() if positions[i] not in pending
    }

    rows: dict[str, dict[int, np.ndarray]] = {
        t: {positions[i]: v for i, v in found[t].items()} for t in names
    }
    engine_name, shapes = "cache", None
    if todo:
        from finetune.anatomy import Concatenated
        from finetune.engine import engine_key, make_engine

        device = pick_device(device) if isinstance(device, str) else device  # "auto", "cuda:1", ...
        multi = network()
        shapes = _tap_shapes(multi, preprocessing.input_size)
        # The exported engine is keyed like the cache (weights fingerprint), with or without caching.
        digest = "+".join(i.digest for i in idents) if fingerprinted else None
        key = engine_key(digest, preprocessing.input_size) if digest else None
        engine = make_engine(Concatenated(multi), key, preprocessing.input_size, device, log=log)
        engine_name = engine.name
        workers = default_workers() if workers is None else workers
        mine, world = _shard(todo)
        x_new, p_new, new_bad = _run_engine(
            engine, index, mine, preprocessing, batch_size, workers, description
        )
        if world > 1:
            x_new, p_new, new_bad = _gather(x_new, p_new, new_bad)
            use_cache = use_cache and _rank() == 0  # every rank has every row; one writes the cache
        bad.update(new_bad)
        bounds = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        key_of = dict(zip(positions, keys)) if use_cache else {}
        if use_cache and new_bad:
            for t in names:
                stores[t].store_failures({key_of[p]: why for p, why in new_bad.items()})
        for k, t in enumerate(names):
            block = x_new[:, bounds[k] : bounds[k + 1]] if len(x_new) else np.zeros((0, 0), np.float32)
            missing = [r for r, p in enumerate(p_new) if int(p) not in rows[t]]
            rows[t].update({int(p_new[r]): block[r] for r in missing})
            if use_cache and missing:
                stores[t].store([key_of[int(p_new[r])] for r in missing], block[missing])

    seconds = time.perf_counter() - start
    kept = [p for p in positions if all(p in rows[t] for t in names)]
    labels = np.asarray([index.labels[p] for p in kept], dtype=np.int64)
    out: dict[str, Features] = {}
    for k, t in enumerate(names):
        dim = next(iter(rows[t].values())).shape[0] if rows[t] else 0
        x = (
            np.stack([rows[t][p] for p in kept]).astype(np.float32)
            if kept
            else np.zeros((0, dim), np.float32)
        )
        out[t] = Features(
            x,
            np.asarray(kept, dtype=np.int64),
            labels,
            dict(bad),
            seconds,
            hits=len(found[t]),
            engine=engine_name,
            shape=shapes[k] if shapes else (dim,),
        )
    return out
