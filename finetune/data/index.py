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
import io
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.checked import CheckedHeaders
from finetune.data.decode import ImageError, is_image_name, is_litter
from finetune.data.duplicates import Duplicate, describe, identical_groups
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
    duplicates: tuple[Duplicate, ...] = ()  # identical files (for_training scans), with their splits

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
        gone = {self.paths[i] for i in bad}
        dups = []
        for d in self.duplicates:
            kept = [j for j, p in enumerate(d.paths) if p not in gone]
            if len(kept) > 1:
                parts = [tuple(t[j] for j in kept) for t in (d.paths, d.splits, d.classes)]
                dups.append(Duplicate(d.sha256, *parts))
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
            duplicates=tuple(dups),
        )

    @property
    def leaks(self) -> tuple[Duplicate, ...]:
        """Identical files in more than one of train/val/test."""
        return tuple(d for d in self.duplicates if d.crosses_splits)

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
            "duplicates": [d.to_dict() for d in self.duplicates],
        }


@dataclass
class _Found:
    """Mutable accumulator while walking: files per (split, class), and what was left out."""

    checked: CheckedHeaders  # the header check, remembering earlier passes
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


def walk(top: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(top, followlinks=False)` top-down, sorted, hidden folders skipped, without recursion.

    (os.walk recurses before Python 3.12: a tree 1,200 folders deep raised RecursionError.)
    Folder links are listed as folders but not entered, as os.walk does.
    """
    stack = [os.fspath(top)]
    while stack:
        dirpath = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = list(it)
        except OSError:
            continue
        dirs, files = [], []
        for e in entries:
            (dirs if _is_dir(e) else files).append(e)
        dirnames = sorted(e.name for e in dirs if not e.name.startswith("."))
        yield dirpath, dirnames, sorted(e.name for e in files)
        real = {e.name for e in dirs if not e.is_symlink()}
        stack.extend(os.path.join(dirpath, d) for d in reversed(dirnames) if d in real)


def _walk_class(folder: Path, root: Path, found: _Found) -> list[str]:
    """Image files under one class folder (recursively, never following directory symlinks)."""
    images: list[str] = []
    for dirpath, _, filenames in walk(folder):
        for name in filenames:
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
                found.checked.probe(path)
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


def _detect_splits(root: Path, for_training: bool = True) -> dict[str, Path]:
    """{'train': path, 'val': path, 'test': path} when the root holds split folders.

    For training, val/ or test/ holding class folders without a train/ beside them is an error
    (it would train a classifier of the names "val" and "test"); a folder to evaluate may hold
    any of them.
    """
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
    if "train" not in named:
        orphans = [named[k] for k in ("val", "test") if k in named and _holds_class_folders(named[k])]
        if orphans and not for_training:
            return {k: p for k, p in named.items() if p in orphans}
        if orphans:
            names = " and ".join(f"{p.name}/" for p in orphans)
            raise DataError(
                f"{root} has {names} but no train/ folder, so there is nothing to train on",
                f"put the training images in {root / 'train'}/<class>/, or the class folders directly "
                f"in {root}",
            )
        return {}
    return named


def _holds_class_folders(folder: Path) -> bool:
    """A split folder (val/<class>/...), not a class that happens to be called "val" (val/*.jpg)."""
    entries = [e for e in _visible_entries(folder) if not is_litter(e.name)]
    return any(_is_dir(e) for e in entries) and not any(is_image_name(e.name) for e in entries)


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int, groups: Sequence[int] | None = None
) -> list[str]:
    """'train'/'val' per sample: per class max(1, round(f * n)) to val, seeded and reproducible.

    `groups` (one id per sample) keeps identical files together: a group is one unit, counted
    in the class of its first member, and all of it goes to the same split. Every class keeps
    at least one training unit, so a class needs two.
    """
    units: dict[int, list[int]] = {}
    for i, g in enumerate(range(len(labels)) if groups is None else groups):
        units.setdefault(int(g), []).append(i)
    members = list(units.values())  # in order of first appearance
    unit_labels = np.asarray([labels[m[0]] for m in members])
    out = ["train"] * len(labels)
    rng = np.random.default_rng(seed)
    for k in np.unique(unit_labels):
        of_k = np.flatnonzero(unit_labels == k)
        n_val = min(max(1, round(val_fraction * len(of_k))), len(of_k) - 1)
        for u in rng.permutation(of_k)[:n_val]:
            for i in members[int(u)]:
                out[i] = "val"
    return out


def scan(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels_csv: str | os.PathLike | None = None,
    for_training: bool = True,
    remember: bool = False,
) -> DatasetIndex:
    """Index an image folder (or a CSV of `path,label`), check every file's header, split it.

    `for_training=False` indexes a folder to be judged, not learned from (`evaluate`): any
    number of classes and images per class, every split folder kept as it is, nothing split.

    For training, identical files are found (`duplicates`) and kept in one split when the split
    is made here; an empty val/ falls back to a split of train/ (a warning).

    Raises:
        DataError: missing folder, no images; for training also fewer than two classes, a class
            with one image, classes in val/test that train lacks, or val/ and test/ without train/;
            a labels CSV that is not UTF-8 or names an unknown split.
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
    found = _Found(CheckedHeaders(root, remember))
    if labels_csv is not None:
        _scan_csv(Path(labels_csv), root, found)
        layout = "csv"
        split_dirs: dict[str, Path] = {}
    else:
        split_dirs = _detect_splits(root, for_training)
        layout = "split-folders" if split_dirs else "class-folders"
        if split_dirs:
            for name, folder in split_dirs.items():
                _scan_classes(folder, root, name, found)
            for entry in _visible_entries(root):
                if entry.name.lower() not in SPLIT_ALIASES:
                    found.ignored.append(Problem(entry.name, "next to train/val folders: not used"))
        else:
            _scan_classes(root, root, "all", found)
    found.checked.save()
    if not for_training:
        return _assemble_all(root, layout, found)
    return _assemble(root, layout, found, val_fraction, seed, split_dirs)


def _read_csv(csv_path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every row that is not empty or a # comment; UTF-8, with or without BOM."""
    if not csv_path.is_file():
        raise DataError(f"labels file {csv_path} does not exist", "pass a CSV with rows path,label")
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"labels file {csv_path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start})",
            "save it as UTF-8 (a spreadsheet's 'CSV UTF-8')",
        ) from None
    except OSError as err:
        raise DataError(
            f"cannot read labels file {csv_path}: {err.strerror}", "check its permissions"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#"):
            rows.append((reader.line_num, row))
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "label"]:
        rows = rows[1:]
    return rows


def _scan_csv(csv_path: Path, root: Path, found: _Found) -> None:
    """Rows `path,label` (paths relative to root); an optional third column names the split.

    A row with a split (train, val/valid/validation, test) stays in it; rows without one are
    split by `scan`. A path listed twice counts once (the first row).
    """
    seen: dict[str, int] = {}
    for line, row in _read_csv(csv_path):
        if len(row) < 2 or not row[1].strip():
            raise DataError(f"{csv_path} line {line} has no label", "write each row as path,label[,split]")
        rel, label = row[0].strip(), row[1].strip()
        word = row[2].strip().lower() if len(row) > 2 else ""
        if word and word not in SPLIT_ALIASES:
            raise DataError(
                f"{csv_path} line {line}: split {row[2].strip()!r} is not train, val or test",
                "write train, val (or valid, validation) or test, or leave the column empty",
            )
        split = SPLIT_ALIASES.get(word, "all")
        path = (root / rel).resolve()
        if root not in path.parents:
            found.problems.append(Problem(rel, "outside the data folder: not used"))
            continue
        key = path.relative_to(root).as_posix()
        if key in seen:
            found.ignored.append(
                Problem(rel, f"listed again on line {line}: the row on line {seen[key]} counts")
            )
            continue
        seen[key] = line
        try:
            found.checked.probe(path)
        except (ImageError, FileNotFoundError) as err:
            found.problems.append(Problem(rel, getattr(err, "reason", "file not found")))
            continue
        found.files.setdefault((split, label), []).append(key)


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
    root: Path, layout: str, found: _Found, val_fraction: float, seed: int, split_dirs: dict[str, Path]
) -> DatasetIndex:
    """Check the classes, then split: the user's split where given, a seeded stratified one for the rest.

    Explicit splits (split folders, a CSV's split column) are kept; files without one are split
    (identical files together), never files the user put in train. An empty val/ falls back to
    a split of train/, said as a warning.
    """
    class_names = sorted({c for (s, c) in found.files if s in ("train", "all")})
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
    for name in ("val", "test"):
        if name in split_dirs and not any(s == name for (s, _) in found.files):
            what = "a seeded split of train/ is used instead" if name == "val" else "there is no test split"
            found.warnings.append(f"{split_dirs[name].name}/ has no usable images: {what}")
    index = _index(root, layout, found, class_names)
    groups = identical_groups([index.absolute(i) for i in range(len(index.paths))])
    splits = list(index.splits)
    if index.has("val"):  # the user's validation split; rows without a split (CSV) train
        splits = ["train" if s == "all" else s for s in splits]
        index = dataclasses.replace(index, splits=tuple(splits))
        return _with_duplicates(index, groups)
    unassigned = [i for i, s in enumerate(splits) if s == "all"]
    pool = unassigned or [i for i, s in enumerate(splits) if s == "train"]
    labels = index.labels
    in_pool = set(pool)
    counts = Counter(labels[i] for i in pool)
    counts.update(labels[i] for i, s in enumerate(splits) if s == "train" and i not in in_pool)
    small = [class_names[k] for k in range(len(class_names)) if counts.get(k, 0) < 2]
    if small:
        raise DataError(
            f"class {', '.join(small)} has fewer than 2 images",
            "a class needs at least 2 (one to train on, one to validate); add images or remove the folder",
        )
    group_of = {i: min(m) for m in groups.values() for i in m}
    sub = stratified_split([labels[i] for i in pool], val_fraction, seed, [group_of.get(i, i) for i in pool])
    for i, s in zip(pool, sub, strict=True):
        splits[i] = s
    index = dataclasses.replace(index, splits=tuple(splits), split_seed=seed, val_fraction=val_fraction)
    return _with_duplicates(index, groups)


def _with_duplicates(index: DatasetIndex, groups: dict[str, list[int]]) -> DatasetIndex:
    """`index` with its groups of identical files described (the same groups `check` reports)."""
    classes = [index.classes[k] for k in index.labels]
    return dataclasses.replace(index, duplicates=describe(groups, index.paths, index.splits, classes))
