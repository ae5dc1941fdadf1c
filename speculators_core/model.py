"""``SpeculatorModel``: the base class of every draft model, and the speculators on-disk format.

A speculator is a transformers ``PreTrainedModel`` whose ``config.json`` is a
:class:`~speculators_core.config.SpeculatorModelConfig`. This module gives it:

* ``save_pretrained`` that writes safetensors only, into a temporary folder renamed into place,
  so a failure leaves nothing half-written;
* ``from_pretrained`` on an algorithm's class (``Eagle3DraftModel.from_pretrained(folder)``);
  choosing the class from ``speculators_model_type`` needs a plugin host, so it lives in
  :mod:`speculators_core.loading` (``load_speculator(folder)``), as does the registration with
  transformers' ``AutoConfig``/``AutoModel``;
* the algorithm contract that plugins implement (build from a verifier, hidden-state spec,
  training step, drafting session).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from speculators_core.config import SpeculatorModelConfig, read_config_dict
from speculators_core.errors import ConfigError, SpeculatorsError
from speculators_core.features import HiddenStateSpec
from speculators_core.fsutil import atomic_directory

if TYPE_CHECKING:
    from speculators_core.drafting import DraftSession

__all__ = ["WEIGHTS_NAME", "SpeculatorModel", "TrainingStepOutput"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


@dataclass
class TrainingStepOutput:
    """What an algorithm's :meth:`SpeculatorModel.training_step` returns.

    ``loss`` is the scalar to back-propagate. ``metrics`` are detached scalars to log (for
    example ``loss_0``, ``full_acc_0``, ``cond_acc_0``); ``weights`` optionally gives, per
    metric, the count it is an average over, so the trainer can combine micro-batches and ranks
    exactly (a metric without a weight is averaged with weight 1).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


class SpeculatorModel(PreTrainedModel):
    """Base class of all speculator (draft) models.

    Subclasses set ``config_class`` to their :class:`SpeculatorModelConfig` subclass and
    implement the algorithm contract: :meth:`from_verifier`, :meth:`hidden_state_spec`,
    :meth:`training_step` and :meth:`draft_session`. Tensor names are unprefixed
    (``base_model_prefix = ""``), matching what vLLM and upstream speculators read.
    """

    config_class = SpeculatorModelConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    # Subclasses list verifier-owned tensors (frozen targets) that are never saved.
    _keys_to_ignore_on_save: list[str] | None = None

    config: SpeculatorModelConfig

    # ------------------------------------------------------------------ algorithm contract

    @classmethod
    def from_verifier(cls, verifier: str | os.PathLike[str], **options: Any) -> SpeculatorModel:
        """Build a fresh, trainable draft for the verifier in folder ``verifier``.

        ``options`` are the algorithm's own (number of layers, draft vocab size, aux layer ids,
        ...). Frozen parts copied from the verifier (embeddings, final norm, LM-head rows) are
        loaded here.
        """
        raise NotImplementedError(f"{cls.__name__} does not implement from_verifier")

    @classmethod
    def hidden_state_spec_for_verifier(
        cls, verifier: str | os.PathLike[str], **options: Any
    ) -> HiddenStateSpec:
        """The spec a fresh draft for ``verifier`` (built with ``options``) would use.

        Data generation calls this before any draft exists. The default builds the draft and
        asks it; algorithms override it to answer from the verifier's config alone.
        """
        return cls.from_verifier(verifier, **options).hidden_state_spec()

    def hidden_state_spec(self) -> HiddenStateSpec:
        """Which verifier hidden states this draft trains and drafts from."""
        raise NotImplementedError(f"{type(self).__name__} does not implement hidden_state_spec")

    def training_step(self, batch: dict[str, torch.Tensor]) -> TrainingStepOutput:
        """Loss and metrics for one packed batch (see :mod:`speculators_core.batch`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement training_step")

    def draft_session(self, *, batch_size: int = 1) -> DraftSession:
        """A drafting session for the reference decoder (see :mod:`speculators_core.drafting`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement draft_session")

    def draft_logits(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One draft step over whole sequences: logits over the verifier's vocabulary.

        ``input_ids`` ``[B, T]`` are verifier token ids (the token after each feature's
        position), ``features`` ``[B, T, F]`` the verifier features the draft reads (what
        :meth:`hidden_state_spec` names, concatenated). Returns float64 ``[B, T, V]`` with
        ``-inf`` for verifier tokens the draft cannot propose. ``speculators convert --validate``
        compares it with the source checkpoint's own forward.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement draft_logits")

    def compact_frozen_parts(self) -> int:
        """Store frozen verifier copies in a narrower dtype where that changes no value;
        return the bytes saved (0 unless overridden).

        The trainer calls it before training (not under FSDP, whose shards keep one dtype);
        see :func:`~speculators_core.modeling.compact.compact_frozen`.
        """
        return 0

    def attach_verifier_parts(self, verifier: str | os.PathLike[str]) -> None:
        """Re-attach frozen verifier tensors that are not saved (a no-op unless overridden).

        Called by ``from_pretrained(..., verifier=...)`` and by the trainer when resuming, for
        algorithms whose training targets need verifier weights that the checkpoint omits.
        """

    # ------------------------------------------------------------------ format: save

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike[str],
        *,
        overwrite: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write the speculators format to ``save_directory``: ``config.json`` + safetensors.

        The folder is written under a temporary name next to the target and renamed into place
        when complete; on any failure the target is untouched. An existing folder is replaced
        only if ``overwrite`` (the default, as in transformers).
        """
        if self.config.speculators_config is None:
            raise ConfigError(
                "config: missing required field 'speculators_config'; build the model with "
                "from_verifier() or set config.speculators_config before saving"
            )
        self.config._validate_fields()
        kwargs.pop("safe_serialization", None)  # safetensors is the only format written
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            super().save_pretrained(tmp, **kwargs)
            for name in os.listdir(tmp):
                # transformers may add files we never ship (a generation config for a model
                # that does not generate); keep the folder to the format's contents.
                if name == "generation_config.json":
                    os.remove(os.path.join(tmp, name))

    # ------------------------------------------------------------------ format: load

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        config: SpeculatorModelConfig | None = None,
        verifier: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a speculator folder holding this class's ``speculators_model_type``.

        Called on an algorithm's class (``Eagle3DraftModel.from_pretrained(folder)``). To load
        whatever algorithm a folder holds, use :func:`speculators_core.load_speculator`, which
        asks the plugin host for the class. ``verifier`` re-attaches frozen verifier parts
        (see :meth:`attach_verifier_parts`).
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise SpeculatorsError(
                f"speculator folder '{path}' does not exist (hub downloads are not supported here; "
                "pass a local folder)"
            )
        if config is None:
            if cls is SpeculatorModel:
                kind = read_config_dict(path).get("speculators_model_type")
                raise ConfigError(
                    f"SpeculatorModel is the base class and cannot tell which class loads '{path}' "
                    f"(a '{kind}' speculator); use speculators_core.load_speculator(folder), which "
                    "asks the installed plugins, or the algorithm's own model class"
                )
            config = cls.config_class.from_dict(read_config_dict(path), where=str(path))
        declared = getattr(cls.config_class, "speculators_model_type", "")
        if declared and config.speculators_model_type != declared:
            raise ConfigError(
                f"'{path}' holds a '{config.speculators_model_type}' speculator, not a {cls.__name__}; "
                "load it with speculators_core.load_speculator(folder)"
            )
        if (
            not (path / WEIGHTS_NAME).is_file()
            and not (path / f"{WEIGHTS_NAME}.index.json").is_file()
        ):
            raise SpeculatorsError(
                f"'{path}' has no {WEIGHTS_NAME}; a speculator folder holds config.json and safetensors weights"
            )
        model = PreTrainedModel.from_pretrained.__func__(  # type: ignore[attr-defined]
            cls, path, *model_args, config=config, use_safetensors=True, **kwargs
        )
        if verifier is not None:
            model.attach_verifier_parts(verifier)
        return model
