"""EAGLE-3's declared training options are exactly ``from_verifier``'s keyword options."""

from __future__ import annotations

import inspect

from speculators_eagle3 import Eagle3DraftModel
from speculators_eagle3.plugin import TRAINING_OPTIONS, speculators_register_algorithms


def test_declared_options_match_from_verifier() -> None:
    """Same names, same defaults, in the same order; the record carries them."""
    params = [
        p
        for p in inspect.signature(Eagle3DraftModel.from_verifier).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert [o.name for o in TRAINING_OPTIONS] == [p.name for p in params]
    assert {o.name: o.default for o in TRAINING_OPTIONS} == {p.name: p.default for p in params}
    (record,) = speculators_register_algorithms()
    assert tuple(record.training_options) == TRAINING_OPTIONS


def test_options_convert_command_line_text() -> None:
    """--algo-opt text becomes the types from_verifier expects."""
    from speculators_core.options import OptionText, resolve_training_options

    (record,) = speculators_register_algorithms()
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
