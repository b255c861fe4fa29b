"""The names every package of Hylas needs, in the one module that imports nothing else of
Hylas: the error classes, the label that marks "no target", and the file checksum.

It sits in ``configs/`` (``hylas.configs.base``) because that folder is the one every
layer already reads (the recipes) and holds no layer of its own: kernels, model, parallel,
train and data can all import it without importing each other (docs/architecture.md,
"Packages and the import order").
"""

from __future__ import annotations

import hashlib
import os

# The label of a position with no target: cross-entropy skips it (the convention of
# torch.nn.functional.cross_entropy and of transformers).
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one sentence for the user."""


class DataError(ValueError):
    """Input that cannot be used; the message names the file and the problem."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message says which and why."""


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why in one sentence."""


class BundleError(RuntimeError):
    """A module Hylas would bundle imports something an export cannot carry."""


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
