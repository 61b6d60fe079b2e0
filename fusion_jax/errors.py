"""One error family for the whole library.

Every error a user can cause derives from :class:`FusionError`; the CLI prints its message and exits
with status 2. Messages name the file, tensor or option at fault, so that the user can act on them
without reading a traceback.
"""
from __future__ import annotations


class FusionError(Exception):
    """Base of every user-facing error. The CLI maps it to exit status 2."""

    exit_code = 2


class ConfigError(FusionError):
    """A configuration (ml_collections, YAML, config.json or CLI flag) is invalid."""


class CheckpointError(FusionError):
    """A checkpoint on disk cannot be read or does not match what is expected."""


class MissingTensorError(CheckpointError):
    """A tensor that the architecture needs is not in the checkpoint."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape disagrees with the configuration or with another model's tensor."""


class CorruptFileError(CheckpointError):
    """A file is truncated or its header is malformed."""


class UnknownArchitectureError(ConfigError):
    """config.json names an architecture that fusion-jax does not implement."""


class DataError(FusionError):
    """A dataset is missing, empty or malformed."""


class TrainingError(FusionError):
    """Training cannot continue (for example a non-finite loss)."""


class OutputError(FusionError):
    """An output cannot be written: the disk is full, the filesystem is read-only, a file stands where a
    directory belongs, or permission is denied. Nothing half-written is left behind."""
