"""Which hidden states to capture: from explicit layer ids, or asked of an algorithm plugin."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from speculators_core.data.errors import VerifierError
from speculators_core.features import HiddenStateSpec

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost

__all__ = ["SPEC_CLASSMETHOD", "parse_layer_ids", "spec_for_algorithm"]

#: The optional classmethod an algorithm's model class may define to give its spec cheaply:
#: ``hidden_state_spec_for_verifier(verifier_folder) -> HiddenStateSpec``.
SPEC_CLASSMETHOD = "hidden_state_spec_for_verifier"


def parse_layer_ids(text: str) -> tuple[int, ...]:
    """``"2,15,27,30"`` (commas and/or spaces) -> ``(2, 15, 27, 30)``; a one-line error if malformed."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError:
        raise VerifierError(
            f"layer ids must be integers separated by commas, got '{text}' (example: 2,15,27,30)"
        ) from None
    if not ids:
        raise VerifierError("no layer ids given; example: --layer-ids 2,15,27,30")
    return ids


def spec_for_algorithm(
    name: str, verifier: str | os.PathLike[str], *, host: PluginHost | None = None
) -> HiddenStateSpec:
    """The spec the installed algorithm ``name`` trains on, for this verifier.

    Uses the model class's ``hidden_state_spec_for_verifier(verifier)`` classmethod when it
    has one (no model is built); otherwise builds a fresh draft with ``from_verifier`` and asks
    its ``hidden_state_spec()``.
    """
    if host is None:
        from speculators_core.plugins.host import get_host

        host = get_host()
    model_class = host.algorithm(name).model_class
    cheap = getattr(model_class, SPEC_CLASSMETHOD, None)
    if callable(cheap):
        spec = cheap(verifier)
    else:
        spec = model_class.from_verifier(verifier).hidden_state_spec()
    if not isinstance(spec, HiddenStateSpec):
        raise VerifierError(
            f"algorithm '{name}' returned {type(spec).__name__} as its hidden-state spec, "
            "not a HiddenStateSpec"
        )
    return spec
