"""The data doctor: everything `finetune run` would find wrong with a folder, without training.

    report = check("mydata")
    report.classes, report.counts          # what a run would train on
    report.skipped                         # unreadable images, each with path and reason
    report.ignored, report.warnings        # not data (root images, link loops), empty class folders
    report.duplicates                      # identical files (sha256), flagged when they cross splits
    print("\n".join(report.lines()))       # what `finetune check DATA` prints

Every image is fully decoded (with the same decoder feature extraction uses), so a truncated
file that passes the header check is caught here too. Nothing is written anywhere.
A folder a run cannot use at all (no images, one class) raises the same `DataError` as `run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.console import printable
from finetune.data.decode import ImageError, get_decoder
from finetune.data.duplicates import Duplicate, find_duplicates
from finetune.data.index import Problem, scan


@dataclass(frozen=True)
class DataReport:
    """What `check` found: usable images per class and split, and every file left out, with why."""

    root: Path
    layout: str
    decoder: str
    classes: tuple[str, ...]
    counts: dict  # {split: {class: images}}, decodable images only
    skipped: tuple[Problem, ...]  # image names that cannot be read
    ignored: tuple[Problem, ...]  # not data
    warnings: tuple[str, ...]
    duplicates: tuple[Duplicate, ...]

    @property
    def usable(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    @property
    def leaks(self) -> tuple[Duplicate, ...]:
        """Duplicates found in more than one of train/val/test."""
        return tuple(d for d in self.duplicates if d.crosses_splits)

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "decoder": self.decoder,
            "classes": list(self.classes),
            "counts": self.counts,
            "usable": self.usable,
            "skipped": [{"path": p.path, "reason": p.reason} for p in self.skipped],
            "ignored": [{"path": p.path, "reason": p.reason} for p in self.ignored],
            "warnings": list(self.warnings),
            "duplicates": [d.to_dict() for d in self.duplicates],
        }

    def lines(self) -> list[str]:
        """The human report, one finding per line (file names made printable)."""
        root = printable(str(self.root))
        out = [f"{root}: {self.layout}, {len(self.classes)} classes, {self.usable} usable images"]
        for split, per_class in self.counts.items():
            cells = ", ".join(f"{printable(c)}: {n}" for c, n in per_class.items())
            out.append(f"  {split}: {sum(per_class.values())} images ({cells})")
        out += [f"skipped {printable(p.path)}: {p.reason}" for p in self.skipped]
        out += [f"ignored {printable(p.path)}: {p.reason}" for p in self.ignored]
        out += [f"warning: {printable(w)}" for w in self.warnings]
        for d in self.duplicates:
            where = (
                "across splits " + "/".join(sorted(set(d.splits)))
                if d.crosses_splits
                else f"within {d.splits[0]}"
            )
            labels = " with different classes" if d.conflicting_labels else ""
            out.append(f"duplicate ({where}{labels}): {', '.join(printable(p) for p in d.paths)}")
        n_skip, n_ign = len(self.skipped), len(self.ignored)
        n_warn, n_dup = len(self.warnings), len(self.duplicates)
        out.append(
            "no problems found"
            if n_skip + n_ign + n_warn + n_dup == 0
            else f"{n_skip} skipped, {n_ign} ignored, {n_warn} warning(s), "
            f"{n_dup} duplicate group(s) ({len(self.leaks)} across splits)"
        )
        return out


def check(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels_csv: str | os.PathLike | None = None,
    decoder: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> DataReport:
    """Scan, fully decode and hash every image of `root`, and report what a run would do with it.

    Args:
        root: the data folder (any layout `scan` accepts).
        val_fraction, seed: the split a run with the same options would make.
        labels_csv: a CSV of path,label instead of class folders.
        decoder: "fast" or "pil" (default: what feature extraction uses).
        progress: called with 1 after each decoded image.

    Raises:
        DataError: the folder cannot be used at all (missing, no images, one class).
    """
    dec = get_decoder(decoder)
    index = scan(root, val_fraction=val_fraction, seed=seed, labels_csv=labels_csv)
    bad: dict[int, str] = {}
    for i in range(len(index.paths)):
        try:
            dec.decode(index.absolute(i))
        except ImageError as err:
            bad[i] = err.reason
        if progress is not None:
            progress(1)
    good = [i for i in range(len(index.paths)) if i not in bad]
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        members = [i for i in good if index.splits[i] == split]
        if members:
            counts[split] = {
                c: sum(index.labels[i] == k for i in members) for k, c in enumerate(index.classes)
            }
    skipped = index.problems + tuple(Problem(index.paths[i], r) for i, r in sorted(bad.items()))
    return DataReport(
        root=index.root,
        layout=index.layout,
        decoder=dec.name,
        classes=index.classes,
        counts=counts,
        skipped=tuple(sorted(skipped, key=lambda p: p.path)),
        ignored=index.ignored,
        warnings=index.warnings,
        duplicates=find_duplicates(index, good),
    )
