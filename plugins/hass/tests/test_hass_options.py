"""HASS's declared training options are ``from_verifier``'s keyword options it accepts."""

from __future__ import annotations

import inspect

from speculators_hass import EagleDraftModel
from speculators_hass.plugin import TRAINING_OPTIONS, speculators_register_algorithms

#: Accepted by from_verifier only to refuse them with a clear message (full vocabulary).
REFUSED = {"token_counts", "d2t", "t2d"}


def test_declared_options_match_from_verifier() -> None:
    """Same names (less the refused ones), same defaults, in the same order."""
    params = [
        p
        for p in inspect.signature(EagleDraftModel.from_verifier).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in REFUSED
    ]
    assert [o.name for o in TRAINING_OPTIONS] == [p.name for p in params]
    assert {o.name: o.default for o in TRAINING_OPTIONS} == {p.name: p.default for p in params}
    (record,) = speculators_register_algorithms()
    assert tuple(record.training_options) == TRAINING_OPTIONS
