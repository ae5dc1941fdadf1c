"""Registers the EAGLE-1/2 (HASS) algorithm with speculators-core (entry point ``speculators.algorithms:eagle``)."""

from __future__ import annotations

from collections.abc import Sequence

from speculators_core import Algorithm, VllmServing, hookimpl
from speculators_hass.config import EagleSpeculatorConfig
from speculators_hass.lint import EXPORT_HINT, lint_eagle
from speculators_hass.model import EagleDraftModel


@hookimpl
def speculators_register_algorithms() -> Sequence[Algorithm]:
    """The ``eagle`` algorithm (EAGLE-1/2 architecture, HASS training).

    Config and model classes, its check rules, and how vLLM serves it: through an export to
    vLLM's native EAGLE-1 layout, with method ``eagle``.
    """
    return [
        Algorithm(
            name="eagle",
            config_class=EagleSpeculatorConfig,
            model_class=EagleDraftModel,
            description="EAGLE-1/2 draft (final verifier feature, shared LM head) trained with HASS",
            lint=lint_eagle,
            vllm=VllmServing(method="eagle", export=EXPORT_HINT),
        )
    ]
