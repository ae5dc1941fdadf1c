"""Registers the EAGLE-1/2 (HASS) algorithm with speculators-core (entry point ``speculators.algorithms:eagle``)."""

from __future__ import annotations

from collections.abc import Sequence

from speculators_core import Algorithm, TrainingOption, VllmServing, hookimpl
from speculators_core.modeling import ATTENTION_IMPLEMENTATIONS
from speculators_hass.config import EagleSpeculatorConfig
from speculators_hass.lint import EXPORT_HINT, lint_eagle
from speculators_hass.model import EagleDraftModel

__all__ = ["TRAINING_OPTIONS", "speculators_register_algorithms"]

#: The keyword options of :meth:`EagleDraftModel.from_verifier` a user may set, defaults
#: included (a test checks that the two agree). ``token_counts``/``d2t``/``t2d`` are left out:
#: ``from_verifier`` accepts them only to refuse them (an EAGLE-1 draft shares the full
#: vocabulary), so naming them here is refused as early as possible.
TRAINING_OPTIONS: tuple[TrainingOption, ...] = (
    TrainingOption(
        "layernorms", bool, False, "Config field layernorms (not exportable to vLLM's EAGLE)."
    ),
    TrainingOption(
        "feature_norm_before_fc",
        bool,
        False,
        "Config field feature_norm_before_fc (needs layernorms).",
    ),
    TrainingOption("fusion_bias", bool, False, "Config field fusion_bias."),
    TrainingOption("hass_steps", int, 3, "HASS alignment steps (draft tokens trained)."),
    TrainingOption("v_w", float, 1.0, "Weight of the feature-regression loss."),
    TrainingOption("p_w", float, 0.1, "Weight of the distribution (cross-entropy) loss."),
    TrainingOption(
        "topk_w", float, 1.0, "Weight of the top-K distillation loss (0 in stage 1, 1 in stage 2)."
    ),
    TrainingOption("topk", int, 10, "K of the top-K distillation loss."),
    TrainingOption(
        "noise_std", float, 0.2, "Std of the noise added to verifier features in training."
    ),
    TrainingOption(
        "attn_implementation",
        str,
        "sdpa",
        "Attention kernel in training.",
        choices=ATTENTION_IMPLEMENTATIONS,
    ),
    TrainingOption(
        "speculative_tokens",
        int,
        None,
        "Draft tokens per round the greedy proposal records (vLLM's num_speculative_tokens); "
        "unset: hass_steps.",
    ),
    TrainingOption(
        "verifier_name_or_path",
        str,
        None,
        "What the config records as the verifier (unset: the verifier folder's absolute path).",
    ),
    TrainingOption(
        "init_from", str, None, "An eagle folder (e.g. stage 1's final/) to start from."
    ),
    TrainingOption("num_layers", int, None, "Decoder layers; an EAGLE-1 draft has exactly 1."),
    TrainingOption(
        "draft_vocab_size", int, None, "Must be the verifier's vocabulary size (or unset)."
    ),
)


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
            training_options=TRAINING_OPTIONS,
            lint=lint_eagle,
            vllm=VllmServing(method="eagle", export=EXPORT_HINT),
        )
    ]
