"""EAGLE-3's and P-EAGLE's declared training options are exactly ``from_verifier``'s keyword
options."""

from __future__ import annotations

import inspect

from speculators_eagle3 import Eagle3DraftModel
from speculators_eagle3.peagle import PEagleDraftModel
from speculators_eagle3.plugin import (
    PEAGLE_TRAINING_OPTIONS,
    TRAINING_OPTIONS,
    speculators_register_algorithms,
)


def _keyword_defaults(function: object) -> dict[str, object]:
    """Public keyword-only parameters and their defaults, in order."""
    return {
        p.name: p.default
        for p in inspect.signature(function).parameters.values()  # type: ignore[arg-type]
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not p.name.startswith("_")
    }


def test_declared_options_match_from_verifier() -> None:
    """Same names, same defaults, in the same order; the record carries them."""
    params = _keyword_defaults(Eagle3DraftModel.from_verifier)
    assert [o.name for o in TRAINING_OPTIONS] == list(params)
    assert {o.name: o.default for o in TRAINING_OPTIONS} == params
    eagle3, peagle = speculators_register_algorithms()
    assert eagle3.name == "eagle3" and tuple(eagle3.training_options) == TRAINING_OPTIONS
    assert peagle.name == "peagle" and tuple(peagle.training_options) == PEAGLE_TRAINING_OPTIONS


def test_peagle_options_are_its_own_and_the_eagle3_ones_it_passes_on() -> None:
    """P-EAGLE declares its own keyword options (with their defaults) and EAGLE-3's other
    options it hands on, except fc_norm (refused) and the TTT ones (it has no TTT steps)."""
    own = _keyword_defaults(PEagleDraftModel.from_verifier)
    declared = {o.name: o.default for o in PEAGLE_TRAINING_OPTIONS}
    refused = {"fc_norm", "ttt_steps", "ttt_step_loss_decay", "norm_output"}
    passed_on = {
        name: default
        for name, default in _keyword_defaults(Eagle3DraftModel.from_verifier).items()
        if name not in own and name not in refused
    }
    assert declared == {**passed_on, **{k: v for k, v in own.items() if k != "fc_norm"}}


def test_options_convert_command_line_text() -> None:
    """--algo-opt text becomes the types from_verifier expects."""
    from speculators_core.options import OptionText, resolve_training_options

    record, _ = speculators_register_algorithms()
    given = {
        "ttt_steps": OptionText("2"),
        "aux_layer_ids": OptionText("[1,3,5]"),
        "norm_before_residual": OptionText("false"),
        "layer_type": OptionText("qwen3"),
        "ttt_step_loss_decay": OptionText("0.8"),
    }
    assert resolve_training_options(record, given) == {
        "ttt_steps": 2,
        "aux_layer_ids": [1, 3, 5],
        "norm_before_residual": False,
        "layer_type": "qwen3",
        "ttt_step_loss_decay": 0.8,
    }
