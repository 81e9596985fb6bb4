"""The error hierarchy. Every error raised at a boundary says what was wrong and how to fix it.

FedMergeError
├── ConfigError                 a setting is missing, unknown or out of range
│   └── UnknownAggregatorError  no aggregator registered under that name
├── IncompatibleDeltasError     two state dicts disagree on names, shapes or dtypes
├── AggregatorStateError        begin/add/finalize called out of order
├── InvalidSubmission           a client's submission is rejected (codec/validation subclasses)
├── CodecError                  encoding failed on the sending side
└── StoreIntegrityError         the model store is inconsistent or corrupted
"""

from __future__ import annotations


class FedMergeError(Exception):
    """Base class of every error fedmerge raises on purpose."""


class ConfigError(FedMergeError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class UnknownAggregatorError(ConfigError, KeyError):
    """No aggregator is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IncompatibleDeltasError(FedMergeError, ValueError):
    """Two state dicts (or a delta and its reference) disagree; the message names the first offending key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class AggregatorStateError(FedMergeError, RuntimeError):
    """An aggregator was used out of order (``add`` before ``begin``, ``add`` after ``finalize``...)."""


class InvalidSubmission(FedMergeError, ValueError):
    """A submission was rejected; nothing it carried has been merged or stored."""


class CodecError(FedMergeError, ValueError):
    """A delta could not be encoded with the requested settings."""


class StoreIntegrityError(FedMergeError, RuntimeError):
    """The model store is inconsistent: a blob is corrupted or missing, a manifest is invalid, ..."""
