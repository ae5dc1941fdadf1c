"""Registers EAGLE-3 and P-EAGLE with speculators-core (entry point ``speculators.algorithms:eagle3``).

P-EAGLE ships here rather than as its own distribution: it is the EAGLE-3 model with one more
tensor and another training objective, its tensors and config are EAGLE-3's plus two fields,
vLLM serves it with its EAGLE-3 classes, and its check rules are EAGLE-3's plus three; a second
package would only duplicate (or depend on) all of this one.
"""

from __future__ import annotations

from collections.abc import Sequence

from speculators_core import Algorithm, TrainingOption, VllmServing, hookimpl
from speculators_core.modeling import ATTENTION_IMPLEMENTATIONS
from speculators_core.objectives import objective_spec
from speculators_core.options import int_list, python_value
from speculators_eagle3.config import (
    DRAFT_LAYER_TYPES,
    Eagle3SpeculatorConfig,
    PEagleSpeculatorConfig,
)
from speculators_eagle3.lint import lint_eagle3, lint_peagle
from speculators_eagle3.model import Eagle3DraftModel
from speculators_eagle3.peagle import PEagleDraftModel

__all__ = ["PEAGLE_TRAINING_OPTIONS", "TRAINING_OPTIONS", "speculators_register_algorithms"]

#: The keyword options of :meth:`Eagle3DraftModel.from_verifier`, defaults included (a test
#: checks that the two agree).
TRAINING_OPTIONS: tuple[TrainingOption, ...] = (
    TrainingOption("num_layers", int, 1, "Draft decoder layers (layer 0 takes the 2H input)."),
    TrainingOption(
        "draft_vocab_size",
        int,
        None,
        "Draft vocabulary size; unset keeps the verifier's (needs token_counts or d2t/t2d, "
        "which --vocab provides).",
    ),
    TrainingOption(
        "token_counts",
        python_value,
        None,
        "Token id -> count (mapping or [V] tensor) picking the draft vocabulary; set by --vocab.",
    ),
    TrainingOption("d2t", python_value, None, "Draft-to-target id offsets [Vd]; set by --vocab."),
    TrainingOption("t2d", python_value, None, "Target-in-draft mask [V]; set by --vocab."),
    TrainingOption(
        "aux_layer_ids",
        int_list,
        None,
        "Verifier layers feeding fc, e.g. [2,15,27] (unset: [2, N//2, N-3]).",
    ),
    TrainingOption("norm_before_residual", bool, True, "Config field norm_before_residual."),
    TrainingOption("norm_before_fc", bool, False, "Config field norm_before_fc."),
    TrainingOption("fc_norm", bool, False, "Config field fc_norm."),
    TrainingOption("norm_output", bool, False, "Config field norm_output."),
    TrainingOption(
        "layer_type", str, "llama", "Draft decoder layer kind.", choices=DRAFT_LAYER_TYPES
    ),
    TrainingOption(
        "embed_requires_grad", bool, False, "Train the embedding (copied from the verifier)."
    ),
    TrainingOption("train_lm_head", bool, False, "Train the draft LM head."),
    TrainingOption("ttt_steps", int, 3, "Training-time-test steps (draft tokens trained)."),
    TrainingOption(
        "ttt_step_loss_decay", float, 1.0, "Loss weight gamma**s of TTT step s, in (0, 1]."
    ),
    TrainingOption(
        "objective",
        objective_spec,
        "kl",
        "Per-position loss of every TTT step: an objective's name or a weighted mix, e.g. "
        "kl=0.5,lk=0.5 ('speculators objectives' lists them).",
    ),
    TrainingOption(
        "noise_std", float, 0.05, "Std of the noise added to verifier features in training."
    ),
    TrainingOption(
        "speculative_tokens",
        int,
        None,
        "Draft tokens per round the greedy proposal records (vLLM's num_speculative_tokens); "
        "unset: ttt_steps.",
    ),
    TrainingOption(
        "verifier_name_or_path",
        str,
        None,
        "What the config records as the verifier (unset: the verifier folder's absolute path).",
    ),
    TrainingOption(
        "attn_implementation",
        str,
        "auto",
        "Attention kernel in training (auto: flex on CUDA, else sdpa).",
        choices=("auto", *ATTENTION_IMPLEMENTATIONS),
    ),
    TrainingOption(
        "init_from",
        str,
        None,
        "A saved eagle3 folder (e.g. an earlier run's final/) to start from: a curriculum.",
    ),
)


#: EAGLE-3 options a P-EAGLE draft does not take: it trains every depth at once (no TTT steps),
#: feeds no state back (no ``norm_output``), and vLLM ignores ``fc_norm`` for it.
_NOT_PEAGLE = frozenset({"ttt_steps", "ttt_step_loss_decay", "norm_output", "fc_norm"})

#: The keyword options of :meth:`PEagleDraftModel.from_verifier`, defaults included.
PEAGLE_TRAINING_OPTIONS: tuple[TrainingOption, ...] = (
    *(
        TrainingOption(
            "embed_requires_grad",
            bool,
            True,
            "Train the embedding (the mask token's row above all).",
        )
        if option.name == "embed_requires_grad"
        else TrainingOption(
            "speculative_tokens",
            int,
            None,
            "Draft tokens per round the greedy proposal records (vLLM's "
            "num_speculative_tokens); unset: num_depths.",
        )
        if option.name == "speculative_tokens"
        else option
        for option in TRAINING_OPTIONS
        if option.name not in _NOT_PEAGLE
    ),
    TrainingOption(
        "num_depths", int, 8, "Tokens drafted per forward in training (depths 0..num_depths-1)."
    ),
    TrainingOption("max_anchors", int, 512, "COD sampling: anchors per row at most (0: no limit)."),
    TrainingOption(
        "down_sample_ratio",
        float,
        0.7,
        "COD sampling: depth d keeps about ratio**d of the anchors.",
    ),
    TrainingOption("down_sample_ratio_min", float, 0.2, "COD sampling: the floor of ratio**d."),
    TrainingOption(
        "mask_token_id",
        int,
        None,
        "Token of the mask slots (unset: the tokenizer's mask token, else the first unused "
        "embedding row, else pad/eos/unk).",
    ),
)


@hookimpl
def speculators_register_algorithms() -> Sequence[Algorithm]:
    """The ``eagle3`` algorithm: classes, training options, check rules, vLLM serving."""
    return [
        Algorithm(
            name="eagle3",
            config_class=Eagle3SpeculatorConfig,
            model_class=Eagle3DraftModel,
            description="EAGLE-3: multi-layer verifier features, training-time test, draft vocabulary",
            training_options=TRAINING_OPTIONS,
            lint=lint_eagle3,
            # vLLM reads speculators-format eagle3 folders itself (FORMAT.md 2.1).
            vllm=VllmServing(method="eagle3"),
        ),
        Algorithm(
            name="peagle",
            config_class=PEagleSpeculatorConfig,
            model_class=PEagleDraftModel,
            description="P-EAGLE: EAGLE-3 drafting all k tokens in one forward through mask slots",
            training_options=PEAGLE_TRAINING_OPTIONS,
            lint=lint_peagle,
            # vLLM 0.32 reads "peagle" folders as eagle3 with parallel drafting
            # (FORMAT-PARALLEL.md 1.2); on the explicit path it must be asked for.
            vllm=VllmServing(method="eagle3", speculative_config={"parallel_drafting": True}),
        ),
    ]
