"""Exceptions the training CLI turns into a one-line ``error: ...`` message and a non-zero exit.

Bad input is the common failure of a training run, and a traceback through pandas-like parsing code tells the
user nothing. Every error raised on purpose here names the file, the row or line, and the column involved, so
the message alone is enough to fix the data.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base class: a failure the CLI reports as ``error: <message>`` without a traceback."""

    exit_code = 2


class DataError(TrainingError):
    """The input data cannot be used: missing file or column, empty, one class, undecodable bytes..."""


class ParityError(TrainingError):
    """An exported ONNX graph does not reproduce the PyTorch logits closely enough to be served."""

    exit_code = 3
