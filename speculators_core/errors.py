"""User-facing error types: each carries one line that names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConversionError",
    "PluginError",
    "SpeculatorsError",
    "UnknownAlgorithmError",
]


class SpeculatorsError(Exception):
    """Base class of the errors this project raises for bad input.

    The CLI prints ``str(error)`` as one line and exits non-zero (the traceback only with
    ``--debug``), so the message must say what was wrong, with the offending value, and what to
    do about it.
    """


class ConfigError(SpeculatorsError, ValueError):
    """A speculator ``config.json`` (or a config object) is malformed or inconsistent."""


class PluginError(SpeculatorsError):
    """A plugin could not be loaded, registered, or selected."""


class UnknownAlgorithmError(PluginError, KeyError):
    """No installed plugin provides the requested algorithm (``speculators_model_type``)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ConversionError(SpeculatorsError):
    """A source checkpoint cannot be converted (unreadable, incomplete, or inconsistent), or the
    converted folder does not reproduce it (``speculators convert --validate``)."""
