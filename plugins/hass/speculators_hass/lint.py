"""``speculators check`` rules for ``eagle`` (EAGLE-1/2, HASS) folders.

vLLM does not read speculators ``eagle`` folders; it serves their export to the native EAGLE-1
layout (:mod:`speculators_hass.export`, ``speculators hass export-vllm``), which the core's
check already says from this plugin's :class:`~speculators_core.VllmServing`. What is left to
check here is whether the draft can be exported at all: the layout has no ``fc`` bias and no
extra norms, so a draft trained with ``fusion_bias`` or ``layernorms`` cannot be served.
"""

from __future__ import annotations

from collections.abc import Iterable

from speculators_core import Finding, LintContext

__all__ = ["EXPORT_HINT", "lint_eagle"]

#: How to make what vLLM serves from an ``eagle`` folder (the fix in check and serve messages).
EXPORT_HINT = (
    "export it with 'speculators hass export-vllm FOLDER OUTPUT' and serve OUTPUT with "
    "--speculative-config method 'eagle' next to the verifier"
)

# Config flags the native EAGLE-1 layout cannot express (speculators_hass.export refuses them).
_NOT_EXPORTABLE = ("fusion_bias", "layernorms", "feature_norm_before_fc")


def lint_eagle(context: LintContext) -> Iterable[Finding]:
    """The ``eagle`` findings about ``context``'s folder (see the module doc)."""
    which = [name for name in _NOT_EXPORTABLE if context.config.get(name) is True]
    if which:
        yield context.config_finding(
            "eagle-not-exportable",
            f"{' and '.join(f'{name}=true' for name in which)}: vLLM's native EAGLE layout "
            "cannot express it (its fc has no bias and the draft no extra norms), so the draft "
            "cannot be exported for vLLM",
            "train the draft with fusion_bias=false and layernorms=false to serve it in vLLM",
        )
