"""Registers the converters with speculators-core (entry point ``speculators.converters:converters``)."""

from __future__ import annotations

from collections.abc import Sequence

from speculators_converters.dflash import convert_zlab_dflash, detect_zlab_dflash
from speculators_converters.eagle import (
    convert_safeailab_eagle,
    convert_speculators_eagle,
    detect_safeailab_eagle,
    detect_speculators_eagle,
)
from speculators_converters.eagle3 import (
    convert_safeailab_eagle3,
    convert_speculators_eagle3,
    detect_safeailab_eagle3,
    detect_speculators_eagle3,
)
from speculators_core import Converter, hookimpl

__all__ = ["CONVERTERS", "speculators_register_converters"]

#: Every converter this distribution provides, by the name ``speculators convert --from`` takes.
CONVERTERS: tuple[Converter, ...] = (
    Converter(
        name="safeailab-eagle",
        algorithm="eagle",
        detect=detect_safeailab_eagle,
        convert=convert_safeailab_eagle,
        description="SafeAILab EAGLE-1/2 and HASS checkpoints (fc + layers.0.*, optional fc.bias)",
    ),
    Converter(
        name="safeailab-eagle3",
        algorithm="eagle3",
        detect=detect_safeailab_eagle3,
        convert=convert_safeailab_eagle3,
        description="SafeAILab EAGLE-3 checkpoints (midlayer.*, fc, d2t/t2d)",
    ),
    Converter(
        name="speculators-eagle",
        algorithm="eagle",
        detect=detect_speculators_eagle,
        convert=convert_speculators_eagle,
        description="upstream speculators v0.1-0.6 'eagle' folders, rewritten in the current format",
    ),
    Converter(
        name="speculators-eagle3",
        algorithm="eagle3",
        detect=detect_speculators_eagle3,
        convert=convert_speculators_eagle3,
        description="upstream speculators 'eagle3' folders (legacy Eagle3Speculator layout, "
        "v0.3+ trained), rewritten in the current format",
    ),
    Converter(
        name="zlab-dflash",
        algorithm="dflash",
        detect=detect_zlab_dflash,
        convert=convert_zlab_dflash,
        description="z-lab DFlash drafts (dflash_config, fc + hidden_norm + Qwen3 layers, "
        "optional fused qkv_proj)",
    ),
)


@hookimpl
def speculators_register_converters() -> Sequence[Converter]:
    """The five converters of speculators-converters."""
    return list(CONVERTERS)
