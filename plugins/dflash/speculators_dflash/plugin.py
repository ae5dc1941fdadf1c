"""Registers the DFlash algorithm with speculators-core (entry point ``speculators.algorithms:dflash``)."""

from __future__ import annotations

from collections.abc import Sequence

from speculators_core import Algorithm, TrainingOption, VllmServing, hookimpl
from speculators_core.objectives import objective_spec
from speculators_core.options import int_list, python_value
from speculators_dflash.config import DFlashSpeculatorConfig
from speculators_dflash.lint import lint_dflash
from speculators_dflash.model import POSITION_WEIGHTS, DFlashDraftModel

__all__ = ["TRAINING_OPTIONS", "speculators_register_algorithms"]

#: The keyword options of :meth:`DFlashDraftModel.from_verifier`, defaults included (a test
#: checks that the two agree).
TRAINING_OPTIONS: tuple[TrainingOption, ...] = (
    TrainingOption("num_layers", int, 1, "Draft decoder layers."),
    TrainingOption(
        "block_size", int, 8, "Anchor + mask slots per block; k <= block_size - 1 is trained."
    ),
    TrainingOption(
        "draft_vocab_size",
        int,
        None,
        "Draft vocabulary size; unset keeps the verifier's (a smaller one needs --vocab).",
    ),
    TrainingOption(
        "token_counts", python_value, None, "Token id -> count picking the draft vocabulary."
    ),
    TrainingOption("d2t", python_value, None, "Draft-to-target id offsets [Vd]; set by --vocab."),
    TrainingOption("t2d", python_value, None, "Target-in-draft mask [V]; set by --vocab."),
    TrainingOption(
        "aux_layer_ids", int_list, None, "Verifier layers feeding fc (unset: [2, N//2, N-3])."
    ),
    TrainingOption(
        "mask_token_id",
        int,
        None,
        "Token of the mask slots (unset: the tokenizer's mask token, else the first unused "
        "embedding row, else pad/eos/unk).",
    ),
    TrainingOption("max_anchors", int, 128, "Blocks per packed row at most (random anchors)."),
    TrainingOption(
        "position_weight",
        str,
        "dpace",
        "Per-slot loss weight: dpace, exp (exp(-(i-1)/decay_gamma)) or uniform.",
        choices=POSITION_WEIGHTS,
    ),
    TrainingOption("dpace_alpha", float, 0.5, "D-PACE confidence smoothing."),
    TrainingOption("decay_gamma", float, 4.0, "Decay of the 'exp' position weight."),
    TrainingOption(
        "objective",
        objective_spec,
        "ce",
        "Per-slot loss: an objective's name or a weighted mix ('speculators objectives').",
    ),
    TrainingOption(
        "noise_std", float, 0.0, "Std of the uniform noise on verifier states in training."
    ),
    TrainingOption(
        "speculative_tokens",
        int,
        None,
        "Draft tokens per round recorded (vLLM's num_speculative_tokens); unset: block_size - 1.",
    ),
    TrainingOption(
        "verifier_name_or_path",
        str,
        None,
        "What the config records as the verifier (unset: the verifier folder's absolute path).",
    ),
    TrainingOption(
        "attn_implementation", str, "sdpa", "Attention kernel.", choices=("sdpa", "eager")
    ),
)


@hookimpl
def speculators_register_algorithms() -> Sequence[Algorithm]:
    """The ``dflash`` algorithm: classes, training options, check rules, vLLM serving."""
    return [
        Algorithm(
            name="dflash",
            config_class=DFlashSpeculatorConfig,
            model_class=DFlashDraftModel,
            description="DFlash: a block drafter conditioned on verifier states, k tokens per forward",
            training_options=TRAINING_OPTIONS,
            lint=lint_dflash,
            # vLLM 0.32 reads speculators-format dflash folders itself (parallel drafting is
            # forced on for the method).
            vllm=VllmServing(method="dflash"),
        )
    ]
