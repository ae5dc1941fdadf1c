"""``SpeculatorModel``: the base class of every draft model, and the speculators on-disk format.

A speculator is a transformers ``PreTrainedModel`` whose ``config.json`` is a
:class:`~speculators_core.config.SpeculatorModelConfig`. This module gives it:

* ``save_pretrained`` that writes safetensors only, into a temporary folder renamed into place,
  so a failure leaves nothing half-written;
* ``from_pretrained`` that picks the class from ``speculators_model_type`` through the plugin
  host (``SpeculatorModel.from_pretrained(folder)`` works for any installed algorithm);
* registration with transformers' ``AutoConfig``/``AutoModel`` so ``AutoModel.from_pretrained``
  loads speculators without ``trust_remote_code``;
* the algorithm contract that plugins implement (build from a verifier, hidden-state spec,
  training step, drafting session).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel

from speculators_core.config import (
    CONFIG_NAME,
    SpeculatorModelConfig,
    load_config,
    read_config_dict,
)
from speculators_core.errors import ConfigError, SpeculatorsError
from speculators_core.features import HiddenStateSpec
from speculators_core.fsutil import atomic_directory

if TYPE_CHECKING:
    from speculators_core.drafting import DraftSession
    from speculators_core.plugins.host import PluginHost
    from speculators_core.plugins.records import Algorithm

__all__ = [
    "SpeculatorModel",
    "TrainingStepOutput",
    "install_auto_config_loader",
    "register_auto_classes",
]

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
        host: PluginHost | None = None,
        verifier: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a speculator folder; the class comes from its ``speculators_model_type``.

        Called on ``SpeculatorModel`` itself, the installed plugin that provides the type is
        looked up through the plugin host. Called on a subclass, the folder's type must match.
        ``verifier`` re-attaches frozen verifier parts (see :meth:`attach_verifier_parts`).
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise SpeculatorsError(
                f"speculator folder '{path}' does not exist (hub downloads are not supported here; "
                "pass a local folder)"
            )
        if config is None:
            config = load_config(path, host=host)
        target = _class_for_config(config, host)
        if (
            cls is not SpeculatorModel
            and not issubclass(target, cls)
            and not issubclass(cls, target)
        ):
            raise ConfigError(
                f"'{path}' holds a '{config.speculators_model_type}' speculator, not a {cls.__name__}; "
                "load it with SpeculatorModel.from_pretrained"
            )
        load_cls = cls if cls is not SpeculatorModel and issubclass(cls, target) else target
        if (
            not (path / WEIGHTS_NAME).is_file()
            and not (path / f"{WEIGHTS_NAME}.index.json").is_file()
        ):
            raise SpeculatorsError(
                f"'{path}' has no {WEIGHTS_NAME}; a speculator folder holds config.json and safetensors weights"
            )
        model = PreTrainedModel.from_pretrained.__func__(  # type: ignore[attr-defined]
            load_cls, path, *model_args, config=config, use_safetensors=True, **kwargs
        )
        if verifier is not None:
            model.attach_verifier_parts(verifier)
        return model


def _class_for_config(
    config: SpeculatorModelConfig, host: PluginHost | None
) -> type[SpeculatorModel]:
    if host is None:
        from speculators_core.plugins.host import get_host

        host = get_host()
    algo = host.algorithm(config.speculators_model_type)
    return algo.model_class


# ------------------------------------------------------------------------------------------------
# transformers Auto classes
# ------------------------------------------------------------------------------------------------


def register_auto_classes(algorithm: Algorithm) -> None:
    """Register one algorithm's config and model classes with ``AutoConfig``/``AutoModel``."""
    config_cls = algorithm.config_class
    key = f"speculators-{algorithm.name}"
    if config_cls.model_type != key:
        # Each algorithm needs its own registry key; set it on the class (it is never written).
        config_cls.model_type = key
    AutoConfig.register(key, config_cls, exist_ok=True)
    AutoModel.register(config_cls, algorithm.model_class, exist_ok=True)


@functools.cache
def install_auto_config_loader() -> None:
    """Teach ``AutoConfig.from_pretrained`` to recognise speculators folders.

    A speculators ``config.json`` deliberately has no top-level ``model_type`` (vLLM relies on
    its absence), so transformers cannot pick a config class for it by itself. This wraps
    ``AutoConfig.from_pretrained`` once: a local folder whose config has
    ``speculators_config`` and no ``model_type`` is loaded through the plugin host (which also
    registers the algorithm's ``AutoModel`` mapping); everything else goes to transformers
    unchanged. Called when ``speculators_core`` is imported; it imports no plugin.
    """
    original = AutoConfig.from_pretrained.__func__  # type: ignore[attr-defined]

    @functools.wraps(original)
    def from_pretrained(
        cls: Any, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any
    ) -> Any:
        path = Path(str(pretrained_model_name_or_path))
        cfg_file = path / CONFIG_NAME
        if cfg_file.is_file():
            try:
                data = read_config_dict(cfg_file)
            except ConfigError:
                data = {}
            if "model_type" not in data and "speculators_config" in data:
                from speculators_core.plugins.host import get_host

                host = get_host()
                host.register_with_transformers()
                config = load_config(data, host=host)
                config.name_or_path = str(path)
                if kwargs.get("return_unused_kwargs"):
                    unused = {
                        k: v
                        for k, v in kwargs.items()
                        if k
                        not in {
                            "return_unused_kwargs",
                            "trust_remote_code",
                            "code_revision",
                            "_from_auto",
                        }
                        and k not in _HUB_KWARGS
                    }
                    return config, unused
                return config
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    AutoConfig.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]


# Hub keyword arguments AutoModel forwards to AutoConfig; they are not config overrides.
_HUB_KWARGS = frozenset(
    {
        "cache_dir",
        "force_download",
        "proxies",
        "revision",
        "token",
        "local_files_only",
        "subfolder",
        "_commit_hash",
        "adapter_kwargs",
    }
)
