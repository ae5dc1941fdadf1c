"""Errors of the training engine: one-line messages that name the value and the fix."""

from __future__ import annotations

from speculators_core.errors import SpeculatorsError

__all__ = ["DataError", "ResumeError", "TrainingConfigError"]


class TrainingConfigError(SpeculatorsError, ValueError):
    """A training argument (or a config-file entry) is invalid."""


class DataError(SpeculatorsError, ValueError):
    """A training sample or data source is malformed, or does not fit the run."""


class ResumeError(SpeculatorsError):
    """A checkpoint cannot be resumed (missing pieces, or it belongs to a different run)."""
