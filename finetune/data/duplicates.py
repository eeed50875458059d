"""Files with identical bytes: found once, used by `scan` (to split) and `check` (to report).

    groups = identical_groups([root / p for p in paths])   # [[0, 7], [3, 4, 9]]: positions per group
    dups = describe(groups, paths, splits, class_of)       # Duplicate(sha256, paths, splits, classes)

Sizes are compared first and only files whose size collides are hashed (sha256), so a folder
of photos costs one `stat` per file. A copy in another split leaks a validation image into
training: `scan` keeps identical files in the same split when it makes the split, and a run
warns when the user's own split has one across train/val/test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from finetune.io import sha256_file


@dataclass(frozen=True)
class Duplicate:
    """Files with identical bytes. Across splits they leak validation images into training."""

    sha256: str
    paths: tuple[str, ...]
    splits: tuple[str, ...]  # one per path
    classes: tuple[str, ...]  # one per path

    @property
    def crosses_splits(self) -> bool:
        return len(set(self.splits)) > 1

    @property
    def conflicting_labels(self) -> bool:
        return len(set(self.classes)) > 1

    def to_dict(self) -> dict:
        return {
            "sha256": self.sha256,
            "paths": list(self.paths),
            "splits": list(self.splits),
            "classes": list(self.classes),
            "crosses_splits": self.crosses_splits,
        }


def identical_groups(files: Sequence[str | os.PathLike]) -> dict[str, list[int]]:
    """{sha256: positions} for every set of two or more files with the same bytes, in file order.

    A file that cannot be read (gone since the scan) is in no group.
    """
    by_size: dict[int, list[int]] = {}
    for i, f in enumerate(files):
        try:
            by_size.setdefault(os.stat(f).st_size, []).append(i)
        except OSError:
            continue
    by_hash: dict[str, list[int]] = {}
    for members in by_size.values():
        if len(members) < 2:
            continue
        for i in members:
            try:
                by_hash.setdefault(sha256_file(files[i]), []).append(i)
            except OSError:
                continue
    return {sha: sorted(m) for sha, m in by_hash.items() if len(m) > 1}


def describe(
    groups: dict[str, list[int]], paths: Sequence[str], splits: Sequence[str], classes: Sequence[str]
) -> tuple[Duplicate, ...]:
    """The groups as `Duplicate`s (paths, splits and classes per member), sorted by their paths."""
    out = [
        Duplicate(
            sha,
            tuple(paths[i] for i in members),
            tuple(splits[i] for i in members),
            tuple(classes[i] for i in members),
        )
        for sha, members in groups.items()
    ]
    return tuple(sorted(out, key=lambda d: d.paths))


def find_duplicates(index, positions: Sequence[int]) -> tuple[Duplicate, ...]:
    """Groups of identical files among `positions` of a DatasetIndex (what `check` and `run` report)."""
    positions = list(positions)
    groups = identical_groups([index.absolute(i) for i in positions])
    return describe(
        {sha: [positions[m] for m in members] for sha, members in groups.items()},
        index.paths,
        index.splits,
        [index.classes[k] for k in index.labels],
    )
