"""Domain errors: what went wrong, and what the user can do about it.

The library raises these; `cli.py` turns each into one line on stderr and exit code 2::

    raise DataError("no images found in ./mydata", "put images in ./mydata/<class>/*.jpg")
    # cli prints: error: no images found in ./mydata — put images in ./mydata/<class>/*.jpg
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A mistake the user can fix. `what` is the problem, `todo` the next step."""

    def __init__(self, what: str, todo: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.todo = todo

    def __str__(self) -> str:
        return f"{self.what} — {self.todo}" if self.todo else self.what


class DataError(FinetuneError):
    """The image folder (or CSV) cannot be used as given."""


class BackboneError(FinetuneError):
    """Unknown backbone name, tap or stage."""


class WeightsError(FinetuneError):
    """Weights missing offline, unsafe or not matching the network."""


class RecipeError(FinetuneError):
    """A recipe key or value is wrong."""


class ConfigError(FinetuneError):
    """A run's settings (a `--config` file, or options given from Python) are wrong."""


class RunError(FinetuneError):
    """A run folder is missing or is not a finetune run."""


class TrainingError(FinetuneError):
    """Training cannot go on (NaN loss, out of memory at batch size 1, ...)."""
