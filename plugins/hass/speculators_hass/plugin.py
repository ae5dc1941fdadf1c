"""Registers the EAGLE-1/2 (HASS) algorithm with speculators-core (entry point ``speculators.algorithms:eagle``)."""

from __future__ import annotations

from collections.abc import Sequence

from speculators_core import Algorithm, hookimpl
from speculators_hass.config import EagleSpeculatorConfig
from speculators_hass.model import EagleDraftModel


@hookimpl
def speculators_register_algorithms() -> Sequence[Algorithm]:
    """The ``eagle`` algorithm (EAGLE-1/2 architecture, HASS training): config and model classes."""
    return [
        Algorithm(
            name="eagle",
            config_class=EagleSpeculatorConfig,
            model_class=EagleDraftModel,
            description="EAGLE-1/2 draft (final verifier feature, shared LM head) trained with HASS",
        )
    ]
