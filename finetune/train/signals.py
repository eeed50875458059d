"""SIGINT / SIGTERM during training: a flag the loop reads after each batch, then a checkpoint and an exit.

signals = Signals()
with signals.installed():
    ... if signals.received: save, raise Interrupted(...)
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finetune.errors import TrainingError

log = logging.getLogger(__name__)


class Interrupted(TrainingError):
    """SIGINT / SIGTERM during training: a checkpoint was saved; exit 130 / 143 like the shell."""

    def __init__(self, what: str, todo: str, exit_code: int) -> None:
        super().__init__(what, todo)
        self.exit_code = exit_code


class _Signals:
    """SIGINT/SIGTERM set a flag the loop reads after each batch; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            f"{signal.Signals(signum).name}: saving a checkpoint after this batch (Ctrl-C again to abort)"
        )

    @contextmanager
    def installed(self) -> Iterator[_Signals]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only live in the main thread
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in self._old.items():
                signal.signal(s, h)
