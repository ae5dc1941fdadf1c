"""Errors of the training-data pipeline; each message is one line with the value and the fix."""

from __future__ import annotations

from speculators_core.errors import SpeculatorsError

__all__ = [
    "ChatTemplateError",
    "DataSourceError",
    "DatasetFormatError",
    "StoreError",
    "VerifierError",
    "VerifierMismatchError",
]


class DataSourceError(SpeculatorsError, ValueError):
    """Chat data could not be found or read (missing path, empty file, malformed JSON)."""


class ChatTemplateError(SpeculatorsError, ValueError):
    """The verifier has no usable chat template, or it cannot be used to derive loss masks."""


class VerifierError(SpeculatorsError, ValueError):
    """The verifier folder is missing, incomplete, or of an unsupported architecture."""


class DatasetFormatError(SpeculatorsError, ValueError):
    """A prepared-data folder is missing, incomplete or corrupt."""


class StoreError(SpeculatorsError, ValueError):
    """A hidden-state store is missing, incomplete, corrupt, or inconsistent with a run."""


class VerifierMismatchError(StoreError):
    """Data made from one verifier is used with another."""
