"""Errors the command-line tools turn into one clear message (no stack trace)."""


class VoloJaxError(Exception):
    """Base class: a user-facing problem with input, weights, data or config."""


class UnknownModelError(VoloJaxError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(VoloJaxError):
    """A checkpoint that is missing, corrupt, or made for another model."""


class CheckpointSaveError(CheckpointError):
    """A training checkpoint whose write failed (a full disk, a quota, a file size limit)."""


class DatasetError(VoloJaxError):
    """A dataset that is not prepared or cannot be read."""


class ImageReadError(VoloJaxError):
    """An image file that cannot be opened or decoded."""


class ConfigError(VoloJaxError):
    """A config value that is unknown, out of range or inconsistent."""


class TrainingDivergedError(VoloJaxError):
    """A non-finite loss or non-finite parameters during training."""
