"""speculators-converters: third-party and older checkpoints into the speculators format.

Formats (``speculators convert SRC --verifier V --output DIR [--from NAME]``):
``safeailab-eagle`` (EAGLE-1/2, HASS), ``safeailab-eagle3``, ``zlab-dflash`` (z-lab DFlash),
``speculators-eagle`` and ``speculators-eagle3`` (older upstream speculators folders). Tensors are streamed one at a
time, so memory stays bounded by a chunk, not by the checkpoint. Each converter writes into the
folder the core gives it and returns the source's own forward; atomic output, ``--overwrite``,
``--dtype`` and ``--validate`` are the core's (:mod:`speculators_core.conversion`).
"""

from speculators_converters.dflash import convert_zlab_dflash
from speculators_converters.eagle import convert_safeailab_eagle, convert_speculators_eagle
from speculators_converters.eagle3 import convert_safeailab_eagle3, convert_speculators_eagle3
from speculators_converters.plugin import CONVERTERS
from speculators_converters.source import SourceCheckpoint

__all__ = [
    "CONVERTERS",
    "SourceCheckpoint",
    "convert_safeailab_eagle",
    "convert_safeailab_eagle3",
    "convert_speculators_eagle",
    "convert_speculators_eagle3",
    "convert_zlab_dflash",
]
