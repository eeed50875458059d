"""SIGINT / SIGTERM during training: a flag the loop reads before each batch, then a checkpoint and an exit.

    signals = Signals()
    with signals.installed():
        for batch in ...:
            if signals.received: save(); raise Interrupted(...)

The handler only sets a flag: the batch being computed finishes, no further batch or validation
pass starts, and the loop saves a checkpoint. A second Ctrl-C aborts at once (KeyboardInterrupt);
SIGTERM (a scheduler's preemption, torchrun forwarding one) cannot be repeated by a person, so
its message does not offer that.
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


# What each signal's first arrival says on the console.
MESSAGES = {
    signal.SIGINT: "SIGINT: stopping after this batch and saving a checkpoint (Ctrl-C again to abort)",
    signal.SIGTERM: "SIGTERM: stopping after this batch and saving a checkpoint",
}


class Signals:
    """SIGINT/SIGTERM set `received`, which the loop reads; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # a repeated SIGTERM: already stopping
        self.received = signum
        log.warning(MESSAGES[signal.Signals(signum)])

    @contextmanager
    def installed(self) -> Iterator[Signals]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only live in the main thread
            return
        for s in MESSAGES:
            self._old[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in self._old.items():
                signal.signal(s, h)
