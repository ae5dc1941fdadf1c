"""Registers the EAGLE-3 algorithm with speculators-core (entry point ``speculators.algorithms:eagle3``)."""

from __future__ import annotations

from collections.abc import Sequence

from speculators_core import Algorithm, VllmServing, hookimpl
from speculators_eagle3.config import Eagle3SpeculatorConfig
from speculators_eagle3.lint import lint_eagle3
from speculators_eagle3.model import Eagle3DraftModel


@hookimpl
def speculators_register_algorithms() -> Sequence[Algorithm]:
    """The ``eagle3`` algorithm: config and model classes, check rules, vLLM serving."""
    return [
        Algorithm(
            name="eagle3",
            config_class=Eagle3SpeculatorConfig,
            model_class=Eagle3DraftModel,
            description="EAGLE-3: multi-layer verifier features, training-time test, draft vocabulary",
            lint=lint_eagle3,
            # vLLM reads speculators-format eagle3 folders itself (FORMAT.md 2.1).
            vllm=VllmServing(method="eagle3"),
        )
    ]
