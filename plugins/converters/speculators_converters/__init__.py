"""speculators-converters: third-party and older checkpoints into the speculators format.

Formats (``speculators convert SRC --verifier V --output DIR [--from NAME]``):
``safeailab-eagle`` (EAGLE-1/2, HASS), ``safeailab-eagle3``, ``speculators-eagle`` and
``speculators-eagle3`` (older upstream speculators folders). Tensors are streamed one at a
time, so memory stays bounded by a chunk, not by the checkpoint.
"""

from speculators_converters.eagle import convert_safeailab_eagle, convert_speculators_eagle
from speculators_converters.eagle3 import convert_safeailab_eagle3, convert_speculators_eagle3
from speculators_converters.errors import ConversionError
from speculators_converters.plugin import CONVERTERS
from speculators_converters.safetensors_io import StreamingSafetensorsWriter, TensorLayout
from speculators_converters.source import SourceCheckpoint
from speculators_converters.validate import ValidationResult

__all__ = [
    "CONVERTERS",
    "ConversionError",
    "SourceCheckpoint",
    "StreamingSafetensorsWriter",
    "TensorLayout",
    "ValidationResult",
    "convert_safeailab_eagle",
    "convert_safeailab_eagle3",
    "convert_speculators_eagle",
    "convert_speculators_eagle3",
]
