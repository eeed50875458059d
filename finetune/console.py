"""What a person sees on the terminal: one logger, progress bars, names printed safely.

    log = logging.getLogger(__name__)      # in every module that talks; messages go to stderr
    setup_logging()                        # once, by the CLI: INFO on rank 0, warnings elsewhere
    with progress_bar("extracting features", total=1797, unit="img") as bar:
        bar.advance(64)
    printable(name)                        # a file name any terminal can print
    print(text_table(["name", "acc"], [["cat", "0.91"]], right=[1]))   # aligned columns, ruled header

The library never prints: it logs to the `finetune` logger, and the CLI decides what reaches
the terminal. Python users see warnings (logging's default) and can `logging.basicConfig` for
more. FINETUNE_PROGRESS=0 silences the bars (tests do; logs stay clean); under torchrun only
rank 0 draws them and logs below WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def printable(text: str) -> str:
    """`text` safe for any terminal: bytes that are not UTF-8 as \\xNN, control characters escaped.

    A file or class name may hold `\\r` or an escape sequence that would rewrite the terminal,
    or bytes that are not valid UTF-8; neither is ever printed raw, and neither crashes.
    """
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


class _Printable(logging.Formatter):
    """The message alone (no level or logger name), made printable line by line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and not text.startswith(("warning", "error")):
            text = f"warning: {text}"
        return "\n".join(printable(line) for line in text.split("\n"))


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is at the time (tests swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send the `finetune` logger to stderr as plain lines; ranks other than 0 keep only warnings.

    Idempotent: the CLI calls it on every invocation.
    """
    logger = logging.getLogger("finetune")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Printable("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level if _main_rank() else logging.WARNING)


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
    return os.environ.get("FINETUNE_PROGRESS", "1") != "0" and _main_rank()


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


def text_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = (), title: str | None = None
) -> str:
    """Rows as aligned plain-text columns under a ruled header, drawn by rich (no colour, no terminal).

    Columns whose index is in `right` are right-aligned (numbers). Cells are shown as typed: a
    class called "[bold]" is not rich markup, and names go through `printable`.
    """
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i, name in enumerate(header):
        table.add_column(Text(name), justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(printable(str(cell))) for cell in row))
    buf = io.StringIO()
    Console(file=buf, width=10_000, color_system=None, highlight=False, emoji=False).print(table)
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    return "\n".join(([title] if title else []) + lines)
