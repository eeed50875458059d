"""Progress bars for long work (extraction, training epochs), on stderr, with a rate.

    with progress_bar("extracting features", total=1797, unit="img") as bar:
        bar.advance(64)

Set FINETUNE_PROGRESS=0 to silence them (tests do; logs stay clean). Under torchrun only
rank 0 draws them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class _Bar:
    def __init__(self, progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


def enabled() -> bool:
    """Bars are on unless FINETUNE_PROGRESS=0; under torchrun only rank 0 draws them."""
    return os.environ.get("FINETUNE_PROGRESS", "1") != "0" and os.environ.get("RANK", "0") == "0"


@contextmanager
def progress_bar(description: str, total: int, unit: str = "img") -> Iterator[_Bar]:
    if not enabled() or total <= 0:
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        class _RateBar(_Bar):
            def advance(self, n: int = 1) -> None:
                progress.advance(task, n)
                speed = progress.tasks[0].speed
                if speed:
                    progress.update(task, rate=f"{speed:.1f} {unit}/s")

        yield _RateBar(progress, task)
