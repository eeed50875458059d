"""Run a frozen network over images and collect pooled features: one extraction path for every caller.

    feats = extract_taps(backbone, ["stage3", "pool"], "avg", index, positions, pre)
    feats["pool"].x          # (N, D) float32, rows in the order of .positions
    feats["pool"].bad        # {position: reason} for files that failed to decode (skipped, reported)
    feats["pool"].hits       # how many rows came from the cache

The network runs in inference mode, batched, on the fastest engine for the device
(`engine.py`), while DataLoader workers decode and resize the next batches; rows already in
the feature cache (`cache.py`) are not computed again. Under torchrun the images are sharded
across ranks and gathered in their original order; which images still need the network is
decided by rank 0 from its cache and shared, and rows another node's cache lacks come from
rank 0, so node-local caches never make one rank skip a gather the others wait in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from finetune.console import progress_bar
from finetune.data.index import DatasetIndex
from finetune.data.loader import ImageDataset, default_workers, make_loader
from finetune.data.transforms import Preprocessing, eval_reader
from finetune.features.cache import FeatureCache, FeatureIdentity
from finetune.io import file_key
from finetune.runtime import Dist, _all_gather_bytes, _rank, _shard, broadcast_bytes, pick_device

log = logging.getLogger(__name__)

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


def _npz(**arrays) -> bytes:
    import io

    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _unnpz(blob: bytes) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _agree(
    positions: list[int],
    names: list[str],
    rows: dict[str, dict[int, np.ndarray]],
    todo: list[int],
    bad: dict[int, str],
) -> tuple[list[int], dict[int, str]]:
    """Rank 0's (images to extract, known failures) on every rank; cached rows a rank lacks, from rank 0.

    Each rank reads its own cache (node-local or shared), but only rank 0's decides: otherwise a
    node with a warm cache skips the gather that a node with a cold one waits in. `rows` is
    completed in place. Collectives: two broadcasts and one all-gather (plus one broadcast of
    the missing rows, when some rank lacks some).
    """
    d = Dist.from_env()
    mine = None
    if d.main:
        mine = _npz(
            todo=np.asarray(todo, np.int64),
            bad_pos=np.asarray(list(bad), np.int64),
            bad_why=np.asarray(list(bad.values()), str),
        )
    z = _unnpz(broadcast_bytes(mine, d))
    todo = z["todo"].tolist()
    bad = dict(zip(z["bad_pos"].tolist(), z["bad_why"].tolist()))
    skip = set(todo) | set(bad)
    lack = [p for p in positions if p not in skip and any(p not in rows[t] for t in names)]
    wanted = sorted(
        {int(p) for blob in _all_gather_bytes(_npz(p=np.asarray(lack, np.int64))) for p in _unnpz(blob)["p"]}
    )
    if wanted:
        sent = (
            _npz(**{f"x{k}": np.stack([rows[t][p] for p in wanted]) for k, t in enumerate(names)})
            if d.main
            else None
        )
        got = _unnpz(broadcast_bytes(sent, d))
        for k, t in enumerate(names):
            for p, row in zip(wanted, got[f"x{k}"]):
                rows[t].setdefault(p, row)
    return todo, bad


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

        from finetune.models.anatomy import OneTap, build_multi_trunk, build_trunk

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
        description,
    )


def extract(
    trunk: nn.Module, index: DatasetIndex, positions: Sequence[int], preprocessing: Preprocessing, **kwargs
) -> Features:
    """Features of any frozen trunk (images (B, 3, H, W) -> (B, D)), e.g. a run's own.

    Keyword arguments as `extract_lazy` (batch_size, workers, device, description, identity, cache).
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
) -> Features:
    """Features of the frozen network `build()` makes, called only when some image is not cached.

    Args:
        identity: what the features depend on; None disables the cache (and the ONNX engine).
        cache: read and write the feature cache.
    """

    def network() -> nn.Module:
        from finetune.models.anatomy import OneTap

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
    keys = [file_key(index.absolute(p)) for p in positions] if use_cache else []  # None: file gone
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
    if Dist.from_env().world > 1:
        todo, bad = _agree(positions, names, rows, todo, bad)
    engine_name, shapes = "cache", None
    if todo:
        from finetune.features.engine import engine_key, make_engine
        from finetune.models.anatomy import Concatenated

        device = pick_device(device) if isinstance(device, str) else device  # "auto", "cuda:1", ...
        multi = network()
        shapes = _tap_shapes(multi, preprocessing.input_size)
        # The exported engine is keyed like the cache (weights fingerprint), with or without caching.
        digest = "+".join(i.digest for i in idents) if fingerprinted else None
        key = engine_key(digest, preprocessing.input_size) if digest else None
        engine = make_engine(Concatenated(multi), key, preprocessing.input_size, device)
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
                stores[t].store_failures({key_of[p]: why for p, why in new_bad.items() if key_of[p]})
        for k, t in enumerate(names):
            block = x_new[:, bounds[k] : bounds[k + 1]] if len(x_new) else np.zeros((0, 0), np.float32)
            missing = [r for r, p in enumerate(p_new) if int(p) not in rows[t]]
            rows[t].update({int(p_new[r]): block[r] for r in missing})
            keep = [r for r in missing if key_of.get(int(p_new[r]))] if use_cache else []
            if keep:
                stores[t].store([key_of[int(p_new[r])] for r in keep], block[keep])

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
