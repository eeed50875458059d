"""Image folders in, a validated and split index out.

Accepted layouts (see data/README.md)::

    DATA/<class>/<image>                          # a seeded, stratified split is made here
    DATA/train/<class>/...  DATA/val/<class>/...  # also valid/ or validation/; optional test/

Usage::

    index = scan("mydata", val_fraction=0.2, seed=0)
    index.classes                # ('cat', 'dog')
    index.indices("train")       # positions into index.paths / index.labels
    index.problems               # files skipped, each with its path and reason

Nothing here ever writes inside the data folder.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.decode import ImageError, is_image_name, is_litter, probe
from finetune.errors import DataError

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Problem:
    """A file that was not used, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class DatasetIndex:
    """Every usable image of a folder with its class and split; what was left out, with reasons."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]  # relative to root, POSIX
    labels: tuple[int, ...]
    splits: tuple[str, ...]  # "train" | "val" | "test", one per path
    layout: str
    problems: tuple[Problem, ...] = ()  # unreadable images: skipped
    ignored: tuple[Problem, ...] = ()  # not images, or not in a class folder
    warnings: tuple[str, ...] = ()
    split_seed: int | None = None
    val_fraction: float | None = None

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def has(self, split: str) -> bool:
        return split in self.splits

    def counts(self, split: str | None = None) -> dict[str, int]:
        """Images per class name, optionally in one split."""
        c = Counter(
            self.labels[i] for i in range(len(self.paths)) if split is None or self.splits[i] == split
        )
        return {name: c.get(k, 0) for k, name in enumerate(self.classes)}

    def absolute(self, i: int) -> Path:
        return self.root / self.paths[i]

    def without(self, bad: dict[int, str]) -> DatasetIndex:
        """A copy with the samples at positions `bad` moved to `problems` (decode failures)."""
        keep = [i for i in range(len(self.paths)) if i not in bad]
        return DatasetIndex(
            root=self.root,
            classes=self.classes,
            paths=tuple(self.paths[i] for i in keep),
            labels=tuple(self.labels[i] for i in keep),
            splits=tuple(self.splits[i] for i in keep),
            layout=self.layout,
            problems=self.problems + tuple(Problem(self.paths[i], r) for i, r in sorted(bad.items())),
            ignored=self.ignored,
            warnings=self.warnings,
            split_seed=self.split_seed,
            val_fraction=self.val_fraction,
        )

    def split_dict(self) -> dict:
        """What `split.json` holds: the relative paths of each split, and how they were made."""
        out: dict = {"layout": self.layout, "seed": self.split_seed, "val_fraction": self.val_fraction}
        for name in ("train", "val", "test"):
            if self.has(name):
                out[name] = [self.paths[i] for i in self.indices(name)]
        return out

    def report_dict(self) -> dict:
        """What `problems.json` holds."""
        return {
            "skipped": [{"path": p.path, "reason": p.reason} for p in self.problems],
            "ignored": [{"path": p.path, "reason": p.reason} for p in self.ignored],
            "warnings": list(self.warnings),
        }


@dataclass
class _Found:
    """Mutable accumulator while walking: files per (split, class), and what was left out."""

    files: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    ignored: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"cannot read folder {folder}: {err.strerror}", "check its permissions") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; a symlink loop is simply not a directory
    except OSError:
        return False


def _walk_class(folder: Path, root: Path, found: _Found) -> list[str]:
    """Image files under one class folder (recursively, never following directory symlinks)."""
    images: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if is_litter(name):
                continue  # hidden files, macOS ._ forks, Thumbs.db: never data, never worth a line
            if not is_image_name(name):
                found.ignored.append(Problem(rel, "not an image file name"))
                continue
            if not os.path.isfile(path):  # dangling symlink or symlink loop
                found.problems.append(Problem(rel, "not a regular file (broken or looping link)"))
                continue
            try:
                probe(path)
            except ImageError as err:
                found.problems.append(Problem(rel, err.reason))
                continue
            images.append(rel)
    return images


def _scan_classes(folder: Path, root: Path, split: str, found: _Found) -> None:
    for entry in _visible_entries(folder):
        rel = Path(entry.path).relative_to(root).as_posix()
        if _is_dir(entry) and _links_to_ancestor(Path(entry.path)):
            found.ignored.append(Problem(rel, "link loop (points to a folder above it): not followed"))
        elif _is_dir(entry):
            images = _walk_class(Path(entry.path), root, found)
            if images:
                found.files[(split, entry.name)] = images
            else:
                found.warnings.append(f"class folder {rel}/ has no usable images: not a class")
        elif is_image_name(entry.name):
            found.ignored.append(Problem(rel, "image outside any class folder: not used"))
        elif not is_litter(entry.name):
            found.ignored.append(Problem(rel, "not in a class folder"))


def _links_to_ancestor(path: Path) -> bool:
    """A symlinked folder that points to itself or a folder above it would list the data twice."""
    if not path.is_symlink():
        return False
    target = path.resolve()
    return target == path.parent.resolve() or target in path.parent.resolve().parents


def _detect_splits(root: Path) -> dict[str, Path]:
    """{'train': path, 'val': path, 'test': path} when the root holds split folders."""
    named = {}
    for entry in _visible_entries(root):
        key = SPLIT_ALIASES.get(entry.name.lower())
        if key and _is_dir(entry):
            if key in named:
                raise DataError(
                    f"{root} has two validation folders ({named[key].name}/ and {entry.name}/)",
                    "keep one of val/, valid/, validation/",
                )
            named[key] = Path(entry.path)
    return named if "train" in named else {}


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> list[str]:
    """'train'/'val' per sample: per class max(1, round(f * n)) to val, seeded and reproducible.

    Every class keeps at least one training image, so a class needs two images.
    """
    labels_arr = np.asarray(labels)
    out = ["train"] * len(labels_arr)
    rng = np.random.default_rng(seed)
    for k in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == k)
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        for i in rng.permutation(members)[:n_val]:
            out[int(i)] = "val"
    return out


def scan(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels_csv: str | os.PathLike | None = None,
    for_training: bool = True,
) -> DatasetIndex:
    """Index an image folder (or a CSV of `path,label`), check every file's header, split it.

    `for_training=False` indexes a folder to be judged, not learned from (`evaluate`): any
    number of classes and images per class, every split folder kept as it is, nothing split.

    Raises:
        DataError: missing folder, no images; for training also fewer than two classes, a class
            with one image, or classes in val/test that train lacks.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist", "pass a folder of class subfolders of images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", "pass a folder of class subfolders of images")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"--val-fraction {val_fraction} is out of range", "use a value between 0 and 1, e.g. 0.2"
        )
    root = root.resolve()
    found = _Found()
    if labels_csv is not None:
        _scan_csv(Path(labels_csv), root, found)
        layout = "csv"
        split_dirs: dict[str, Path] = {}
    else:
        split_dirs = _detect_splits(root)
        layout = "split-folders" if split_dirs else "class-folders"
        if split_dirs:
            for name, folder in split_dirs.items():
                _scan_classes(folder, root, name, found)
            for entry in _visible_entries(root):
                if entry.name.lower() not in SPLIT_ALIASES:
                    found.ignored.append(Problem(entry.name, "next to train/val folders: not used"))
        else:
            _scan_classes(root, root, "all", found)
    if not for_training:
        return _assemble_all(root, layout, found)
    return _assemble(root, layout, found, val_fraction, seed, has_val="val" in split_dirs)


def _scan_csv(csv_path: Path, root: Path, found: _Found) -> None:
    """Rows `path,label` (paths relative to root); an optional third column names the split."""
    if not csv_path.is_file():
        raise DataError(f"labels file {csv_path} does not exist", "pass a CSV with rows path,label")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    for line, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise DataError(f"{csv_path} row {line} has {len(row)} column(s)", "write each row as path,label")
        rel, label = row[0].strip(), row[1].strip()
        split = SPLIT_ALIASES.get(row[2].strip().lower(), "all") if len(row) > 2 else "all"
        path = (root / rel).resolve()
        if root not in path.parents:
            found.problems.append(Problem(rel, "outside the data folder: not used"))
            continue
        try:
            probe(path)
        except (ImageError, FileNotFoundError) as err:
            found.problems.append(Problem(rel, getattr(err, "reason", "file not found")))
            continue
        found.files.setdefault((split, label), []).append(path.relative_to(root).as_posix())


def _index(root: Path, layout: str, found: _Found, class_names: list[str], **split_info) -> DatasetIndex:
    """The DatasetIndex of `found`, files in (split, class, name) order; labels index `class_names`."""
    label_of = {c: k for k, c in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    for (split, cname), files in sorted(found.files.items()):
        paths += files
        labels += [label_of[cname]] * len(files)
        splits += [split] * len(files)
    return DatasetIndex(
        root=root,
        classes=tuple(class_names),
        paths=tuple(paths),
        labels=tuple(labels),
        splits=tuple(splits),
        layout=layout,
        problems=tuple(found.problems),
        ignored=tuple(found.ignored),
        warnings=tuple(found.warnings),
        **split_info,
    )


def _assemble_all(root: Path, layout: str, found: _Found) -> DatasetIndex:
    """Every usable image, whatever its split folder, with no minimum per class (`for_training=False`)."""
    class_names = sorted({c for (_, c) in found.files})
    if not class_names:
        raise DataError(
            f"no images found in {root}", f"put images in {root}/<class>/*.jpg (one folder per class)"
        )
    return _index(root, layout, found, class_names)


def _assemble(
    root: Path, layout: str, found: _Found, val_fraction: float, seed: int, has_val: bool
) -> DatasetIndex:
    train_split = "train" if layout == "split-folders" else "all"
    class_names = sorted({c for (s, c) in found.files if s in (train_split, "all")})
    if not class_names:
        where = f"{root}/train" if layout == "split-folders" else str(root)
        raise DataError(
            f"no images found in {where}", f"put images in {where}/<class>/*.jpg (one folder per class)"
        )
    if len(class_names) < 2:
        raise DataError(
            f"only one class ({class_names[0]}) in {root}: a classifier needs at least two",
            "add a folder of images for each other class",
        )
    stray = sorted({c for (s, c) in found.files if c not in class_names})
    if stray:
        raise DataError(
            f"classes {', '.join(stray)} appear in val/test but not in train",
            "add training images for them or remove them from val/test",
        )
    index = _index(root, layout, found, class_names)
    if has_val:
        return index
    labels, splits = index.labels, list(index.splits)
    pool = [i for i, s in enumerate(splits) if s in ("train", "all")]
    counts = Counter(labels[i] for i in pool)
    small = [class_names[k] for k in range(len(class_names)) if counts.get(k, 0) < 2]
    if small:
        raise DataError(
            f"class {', '.join(small)} has fewer than 2 images",
            "a class needs at least 2 (one to train on, one to validate); add images or remove the folder",
        )
    sub = stratified_split([labels[i] for i in pool], val_fraction, seed)
    for i, s in zip(pool, sub, strict=True):
        splits[i] = s
    return dataclasses.replace(index, splits=tuple(splits), split_seed=seed, val_fraction=val_fraction)
