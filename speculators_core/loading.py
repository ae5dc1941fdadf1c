"""Polymorphic loading: from a folder (or dict) to the config and model class a plugin provides.

The schema (:mod:`speculators_core.config`) and the model base class
(:mod:`speculators_core.model`) know nothing of plugins: building a config or a model in code
loads none. Everything that needs to *choose* a class by ``speculators_model_type`` or
``proposal_type`` lives here, one layer above the plugin host, and takes the host it should
ask:

* :func:`load_config`: a folder, ``config.json`` path or dict to the algorithm's config class;
* :func:`load_speculator`: a speculators folder to the algorithm's model class (what
  ``SpeculatorModel.from_pretrained(folder)`` cannot do without a host);
* :func:`register_with_transformers`: ``AutoConfig``/``AutoModel`` know the host's algorithms,
  so ``AutoModel.from_pretrained(folder)`` loads a speculator without ``trust_remote_code``;
* :func:`validation_context`: the pydantic context that resolves ``proposal_methods`` entries
  through the host's proposal methods.

``host=None`` means the process-wide default host
(:func:`speculators_core.plugins.host.get_host`, built from the environment's plugin settings);
library code passes the host it was given.
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic
from transformers import AutoConfig, AutoModel

from speculators_core.config import (
    CONFIG_NAME,
    PROPOSAL_RESOLVER,
    SpeculatorModelConfig,
    SpeculatorsConfig,
    TokenProposalConfig,
    format_validation_error,
    read_config_dict,
)
from speculators_core.errors import ConfigError, PluginError, SpeculatorsError
from speculators_core.model import SpeculatorModel
from speculators_core.plugins.host import PluginHost, get_host
from speculators_core.plugins.records import Algorithm

__all__ = [
    "install_auto_config_loader",
    "load_config",
    "load_speculator",
    "register_auto_classes",
    "register_with_transformers",
    "validation_context",
]


def _host(host: PluginHost | None) -> PluginHost:
    return host if host is not None else get_host()


def validation_context(host: PluginHost | None = None) -> dict[str, Any]:
    """The pydantic validation context that resolves ``proposal_type`` through ``host``.

    Pass it to ``SpeculatorsConfig.model_validate(data, context=...)`` to accept proposal
    methods that plugins register; without it only the core's own methods are known.
    """
    resolved = _host(host)

    def resolve(name: str) -> type[TokenProposalConfig]:
        try:
            return resolved.proposal_method(name).config_class
        except PluginError as err:  # pydantic reports ValueErrors as field errors
            raise ValueError(str(err)) from err

    return {PROPOSAL_RESOLVER: resolve}


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any], *, host: PluginHost | None = None
) -> SpeculatorModelConfig:
    """Load a speculator config from a folder, a ``config.json`` path or a dict.

    The class is the one ``host`` provides for the config's ``speculators_model_type``; its
    ``proposal_methods`` are resolved through the host's proposal methods. Every failure is a
    one-line :class:`ConfigError` (or a :class:`PluginError` for an algorithm no plugin
    provides, listing the installed ones).
    """
    resolved = _host(host)
    where = "config"
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        data = read_config_dict(path)
        where = str(path / CONFIG_NAME if path.is_dir() else path)
    kind = data.get("speculators_model_type")
    if kind is None:
        if data.get("model_type"):
            raise ConfigError(
                f"{where}: missing required field 'speculators_model_type' (this looks like a plain "
                f"'{data['model_type']}' model, not a speculator; convert it with 'speculators convert')"
            )
        raise ConfigError(f"{where}: missing required field 'speculators_model_type'")
    if not isinstance(kind, str):
        raise ConfigError(
            f"{where}: field 'speculators_model_type' must be a string (got {kind!r})"
        )
    algorithm = resolved.algorithm(kind)
    data.pop("model_type", None)
    spec = data.get("speculators_config")
    if isinstance(spec, Mapping):
        # The one place that needs the host: proposal entries become the classes plugins
        # registered. The rest of the config is validated once, by the class, on construction.
        try:
            data["speculators_config"] = SpeculatorsConfig.model_validate(
                spec, context=validation_context(resolved)
            )
        except pydantic.ValidationError as err:
            raise ConfigError(
                format_validation_error(err, where=where, prefix="speculators_config")
            ) from err
    return typing.cast(SpeculatorModelConfig, algorithm.config_class.from_dict(data, where=where))


def load_speculator(
    folder: str | os.PathLike[str],
    *,
    host: PluginHost | None = None,
    verifier: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> SpeculatorModel:
    """Load a speculators-format folder as the model class its ``speculators_model_type`` names.

    ``verifier`` re-attaches frozen verifier parts the checkpoint omits (see
    :meth:`SpeculatorModel.attach_verifier_parts`); other keyword arguments go to
    ``from_pretrained`` (``dtype=torch.float32``, ...).
    """
    path = Path(folder)
    if not path.is_dir():
        raise SpeculatorsError(
            f"speculator folder '{path}' does not exist (hub downloads are not supported here; "
            "pass a local folder)"
        )
    resolved = _host(host)
    config = load_config(path, host=resolved)
    model_class = resolved.algorithm(config.speculators_model_type).model_class
    _check_weight_files(path)
    return typing.cast(
        SpeculatorModel,
        model_class.from_pretrained(path, config=config, verifier=verifier, **kwargs),
    )


def _check_weight_files(folder: Path) -> None:
    """One line naming the file for a cut-off or unreadable safetensors file (safetensors'
    own error names neither the file nor the fix)."""
    from speculators_core.lint import read_safetensors_header

    for file in sorted(folder.glob("*.safetensors")):
        try:
            read_safetensors_header(file)
        except Exception as err:  # the header reader's own one-line message
            raise SpeculatorsError(str(err)) from None


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


# The hosts registered with transformers, newest first. transformers' registry is process-wide
# and its registrations accumulate, so AutoConfig asks every registered host (then the default
# one) for a folder's type, as AutoModel knows every registered class.
_auto_hosts: list[PluginHost] = []


def _auto_host_for(kind: Any) -> PluginHost:
    """The newest registered host that provides ``kind``, else the default host."""
    for host in _auto_hosts:
        if isinstance(kind, str) and kind in host.algorithms():
            return host
    return get_host()


def register_with_transformers(host: PluginHost | None = None) -> None:
    """Register ``host``'s algorithms with transformers ``AutoConfig``/``AutoModel``.

    After this, ``AutoModel.from_pretrained(folder)`` loads a speculators checkpoint of any of
    those algorithms without ``trust_remote_code``. Idempotent per host.
    """
    resolved = _host(host)
    install_auto_config_loader()
    if host is not None and all(h is not host for h in _auto_hosts):
        _auto_hosts.insert(0, host)
    if resolved._cache.get("auto_registered"):
        return
    for algo in resolved.algorithms().values():
        register_auto_classes(algo)
    resolved._cache["auto_registered"] = True


@functools.cache
def install_auto_config_loader() -> None:
    """Teach ``AutoConfig.from_pretrained`` to recognise speculators folders.

    A speculators ``config.json`` deliberately has no top-level ``model_type`` (vLLM relies on
    its absence), so transformers cannot pick a config class for it by itself. This wraps
    ``AutoConfig.from_pretrained`` once: a local folder whose config has ``speculators_config``
    and no ``model_type`` is loaded through the newest host registered with
    :func:`register_with_transformers` that provides its type (else the default host), which
    also registers the algorithms' ``AutoModel`` mappings; everything else goes to transformers
    unchanged. It imports no plugin itself.
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
                host = _auto_host_for(data.get("speculators_model_type"))
                register_with_transformers(host)
                config = load_config(data, host=host)
                config.name_or_path = str(path)
                if kwargs.get("return_unused_kwargs"):
                    unused = {
                        k: v
                        for k, v in kwargs.items()
                        if k not in _NOT_CONFIG_KWARGS and k not in _HUB_KWARGS
                    }
                    return config, unused
                return config
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    AutoConfig.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]


# Keyword arguments AutoModel forwards to AutoConfig that are not config overrides.
_NOT_CONFIG_KWARGS = frozenset(
    {"return_unused_kwargs", "trust_remote_code", "code_revision", "_from_auto"}
)
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
