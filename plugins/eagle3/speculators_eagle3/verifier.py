"""Reading what an EAGLE-3 draft needs from a verifier folder (moved to the core).

The reader lives in :mod:`speculators_core.modeling.verifier`; these names are re-exported for
code that imports them from here.
"""

from speculators_core.modeling.verifier import (
    VerifierParts,
    load_verifier_config,
    load_verifier_parts,
)

__all__ = ["VerifierParts", "load_verifier_config", "load_verifier_parts"]
