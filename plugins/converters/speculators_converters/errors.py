"""The error converters raise for bad input: one line naming the problem, the value and the fix."""

from __future__ import annotations

from speculators_core import SpeculatorsError

__all__ = ["ConversionError"]


class ConversionError(SpeculatorsError):
    """A source checkpoint cannot be converted (unreadable, incomplete, or inconsistent)."""
