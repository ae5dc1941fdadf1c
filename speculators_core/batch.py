"""The packed training batch that the trainer hands to an algorithm's ``training_step``.

Samples are packed one after another into rows of a fixed length ``T``; a row is described by
these tensors (``B`` rows, ``n`` hidden-state ids of the algorithm's
:class:`~speculators_core.features.HiddenStateSpec`, ``Ht`` the verifier hidden size):

============== ===================== =====================================================
key            shape / dtype         meaning
============== ===================== =====================================================
input_ids      ``[B, T]`` int64      token ids, **unshifted** (as the verifier saw them)
hidden_states  ``[B, T, n, Ht]``     verifier states at the same positions, spec order
loss_mask      ``[B, T]`` int64      1 on tokens the assistant produced, else 0
position_ids   ``[B, T]`` int64      position of each token inside its own sample (from 0)
document_ids   ``[B, T]`` int64      index of the sample within the row; -1 on padding
============== ===================== =====================================================

Each algorithm does its own next-token alignment inside a document (a token's prediction target
is the next token of the *same* document; the last token of a document has none).
"""

from __future__ import annotations

__all__ = ["BATCH_KEYS"]

#: The keys of a packed batch, in the order above.
BATCH_KEYS: tuple[str, ...] = (
    "input_ids",
    "hidden_states",
    "loss_mask",
    "position_ids",
    "document_ids",
)
