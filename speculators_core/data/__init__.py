"""Training data from a verifier: chat rendering and loss masks, response regeneration,
hidden-state capture (offline shard store or online), and the draft vocabulary.

The flow (each step is also a ``speculators data ...`` command)::

    chat data --prepare--> prepared data (input_ids + loss_mask)      data prepare / regenerate
        --verifier forward--> hidden-state store (or train --online)      data hidden-states
        --supervised token counts--> token_freq.json, d2t/t2d               data vocab

A sample is ``{"input_ids": LongTensor[L], "loss_mask": LongTensor[L],
"hidden_states": Tensor[L, n, Ht]}`` everywhere (``hidden_states`` once captured; ``n`` states
in the order of the :class:`~speculators_core.features.HiddenStateSpec`).
"""

from speculators_core.data.capture import HiddenStateCapture, plan_batches
from speculators_core.data.chat import ChatRenderer, RenderedSample
from speculators_core.data.conversations import (
    Conversation,
    SkipCounter,
    Turn,
    load_conversations,
    normalize_record,
)
from speculators_core.data.errors import (
    ChatTemplateError,
    DatasetFormatError,
    DataSourceError,
    StoreError,
    VerifierError,
    VerifierMismatchError,
)
from speculators_core.data.fingerprint import (
    check_verifier_matches,
    tokenizer_fingerprint,
    verifier_fingerprint,
)
from speculators_core.data.prepared import PreparedDataset, PreparedManifest, prepare_data
from speculators_core.data.regenerate import GenerationSettings, regenerate_data
from speculators_core.data.specs import spec_for_algorithm
from speculators_core.data.store import (
    ShardStore,
    ShardStoreWriter,
    StoreManifest,
    capture_to_store,
)
from speculators_core.data.summary import DataSummary
from speculators_core.data.token_freq import (
    build_draft_vocab,
    count_token_frequencies,
    load_token_counts,
    load_vocab_mapping,
)

__all__ = [
    "ChatRenderer",
    "ChatTemplateError",
    "Conversation",
    "DataSourceError",
    "DataSummary",
    "DatasetFormatError",
    "GenerationSettings",
    "HiddenStateCapture",
    "PreparedDataset",
    "PreparedManifest",
    "RenderedSample",
    "ShardStore",
    "ShardStoreWriter",
    "SkipCounter",
    "StoreError",
    "StoreManifest",
    "Turn",
    "VerifierError",
    "VerifierMismatchError",
    "build_draft_vocab",
    "capture_to_store",
    "check_verifier_matches",
    "count_token_frequencies",
    "load_conversations",
    "load_token_counts",
    "load_vocab_mapping",
    "normalize_record",
    "plan_batches",
    "prepare_data",
    "regenerate_data",
    "spec_for_algorithm",
    "tokenizer_fingerprint",
    "verifier_fingerprint",
]
