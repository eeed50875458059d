"""The features file of `finetune extract-features`: arrays per tap plus what each row is.

    write_features("feats.npz", {"fc6": x6, "fc7": x7}, labels, classes, paths, splits, meta)
    ff = read_features("feats.npz")          # or .safetensors
    ff.taps["fc7"]    # (N, D) float32 (or (N, C, H, W) with --pool none)
    ff.labels, ff.class_names, ff.paths, ff.splits

Two formats, neither of them pickle:
- `.npz`: `feat.<tap>` arrays, `labels` (int64), and fixed-width unicode arrays `class_names`,
  `paths`, `split`; `meta` is a JSON string. Loads with `np.load(f, allow_pickle=False)`.
- `.safetensors`: `feat.<tap>` and `labels` tensors; the strings live in the header metadata as
  JSON (`class_names`, `paths`, `split`, `meta`).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.errors import DataError

FORMATS = (".npz", ".safetensors")
PREFIX = "feat."


@dataclass
class FeatureFile:
    """What one features file holds; rows are in the same order in every array."""

    taps: dict[str, np.ndarray]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    paths: list[str]  # relative to the data folder
    splits: list[str]  # "train" | "val" | "test"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def check_output(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Path:
    """Refuse an unknown extension, or a file inside the (read-only) data folder."""
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        raise DataError(
            f"cannot write features as {out.suffix or 'a file without extension'!r}",
            "name the output .npz or .safetensors, e.g. -o feats.npz",
        )
    if data_root is not None:
        root = Path(data_root).resolve()
        if root == out.resolve().parent or root in out.resolve().parents:
            raise DataError(
                f"{out} is inside the data folder {root}, which finetune never writes to",
                "write the features elsewhere, e.g. -o feats.npz",
            )
    return out


def write_features(
    path: str | os.PathLike,
    taps: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: list[str],
    paths: list[str],
    splits: list[str],
    meta: dict | None = None,
) -> Path:
    """Write atomically as .npz or .safetensors (by extension)."""
    from finetune.io import atomic_write, save_tensors

    out = check_output(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    labels = np.asarray(labels, dtype=np.int64)
    if out.suffix.lower() == ".npz":
        arrays = {f"{PREFIX}{t}": np.ascontiguousarray(x, np.float32) for t, x in taps.items()}
        arrays.update(
            labels=labels,
            class_names=np.asarray(class_names, dtype=str),
            paths=np.asarray(paths, dtype=str),
            split=np.asarray(splits, dtype=str),
            meta=np.asarray(json.dumps(meta)),
        )
        atomic_write(out, lambda fh: np.savez(fh, **arrays))
    else:
        import torch

        tensors = {
            f"{PREFIX}{t}": torch.from_numpy(np.ascontiguousarray(x, np.float32)) for t, x in taps.items()
        }
        tensors["labels"] = torch.from_numpy(labels)
        header = {
            "class_names": json.dumps(list(class_names)),
            "paths": json.dumps(list(paths)),
            "split": json.dumps(list(splits)),
            "meta": json.dumps(meta),
        }
        save_tensors(out, tensors, metadata=header)
    return out


def read_features(path: str | os.PathLike) -> FeatureFile:
    """Read a file written by `write_features`; a broken or foreign file is one DataError."""
    src = Path(path)
    if not src.is_file():
        raise DataError(
            f"features file {src} does not exist", "write one with `finetune extract-features DATA -o FILE`"
        )
    if src.suffix.lower() not in FORMATS:
        raise DataError(
            f"{src} is not a features file (.npz or .safetensors)", "pass the -o file of extract-features"
        )
    try:
        if src.suffix.lower() == ".npz":
            with np.load(src, allow_pickle=False) as z:
                taps = {k[len(PREFIX) :]: z[k] for k in z.files if k.startswith(PREFIX)}
                return FeatureFile(
                    taps,
                    z["labels"].astype(np.int64),
                    z["class_names"].tolist(),
                    z["paths"].tolist(),
                    z["split"].tolist(),
                    json.loads(str(z["meta"])),
                )
        from safetensors import safe_open

        with safe_open(str(src), framework="numpy") as f:
            header = f.metadata() or {}
            taps = {k[len(PREFIX) :]: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}  # noqa: SIM118 (safe_open is not a dict)
            labels = f.get_tensor("labels").astype(np.int64)
        return FeatureFile(
            taps,
            labels,
            json.loads(header["class_names"]),
            json.loads(header["paths"]),
            json.loads(header["split"]),
            json.loads(header.get("meta", "{}")),
        )
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise DataError(
            f"{src} is not a finetune features file ({type(err).__name__}: {err})",
            "re-create it with `finetune extract-features`",
        ) from None
