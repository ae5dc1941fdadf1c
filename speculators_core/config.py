"""The speculator config schema: what ``config.json`` of a speculators-format folder holds.

``SpeculatorModelConfig`` is a transformers ``PreTrainedConfig`` (so ``PreTrainedModel``
machinery works) whose own fields are validated by a pydantic schema derived from the class.
It serializes exactly as the speculators format (FORMAT.md 1.2): keys sorted, **no top-level
``model_type``** (vLLM detects speculators checkpoints by its absence), ``speculators_config``
with ``algorithm``, ``proposal_methods``, ``default_proposal_method`` and ``verifier``.

Algorithm plugins subclass ``SpeculatorModelConfig`` and declare their fields as class
annotations with defaults, plus ``speculators_model_type: str = "<name>"``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny
from transformers import PreTrainedConfig

from speculators_core.errors import ConfigError

__all__ = [
    "CONFIG_NAME",
    "PROPOSAL_RESOLVER",
    "GreedyTokenProposalConfig",
    "SpeculatorModelConfig",
    "SpeculatorsConfig",
    "TokenProposalConfig",
    "VerifierConfig",
    "core_version",
    "format_validation_error",
    "layer_config_from_dict",
    "read_config_dict",
]

CONFIG_NAME = "config.json"


@functools.cache
def core_version() -> str:
    """The installed ``speculators-core`` version, written as ``speculators_version``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("speculators-core")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+local"


def format_validation_error(
    error: pydantic.ValidationError, *, where: str = "config", prefix: str = ""
) -> str:
    """One line naming the first invalid field, what is wrong, and the value found.

    ``prefix`` names the object that was validated when it is nested in the config
    (``speculators_config``), so the field reads as its full path.
    """
    first = error.errors()[0]
    loc = ".".join([prefix] * bool(prefix) + [str(p) for p in first["loc"]]) or "(top level)"
    if first["type"] == "missing":
        return f"{where}: missing required field '{loc}'"
    value = first.get("input")
    shown = (
        json.dumps(value, default=str) if not isinstance(value, BaseModel) else type(value).__name__
    )
    if len(shown) > 80:
        shown = shown[:77] + "..."
    more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{where}: field '{loc}': {first['msg']} (got {shown}){more}"


# ------------------------------------------------------------------------------------------------
# Nested pydantic models
# ------------------------------------------------------------------------------------------------


class VerifierConfig(BaseModel):
    """The verifier (target) model a speculator was trained for.

    ``name_or_path`` is what vLLM loads as the target model when the speculator is served
    directly (``vllm serve <speculator>``): a hub id or a path valid where vLLM runs.
    """

    model_config = ConfigDict(extra="allow")

    name_or_path: str | None = None
    architectures: list[str] = Field(default_factory=list)

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike[str] | PreTrainedConfig, *, name_or_path: str | None = None
    ) -> VerifierConfig:
        """Build from a verifier folder (its ``config.json``) or its loaded config.

        ``name_or_path`` overrides what is recorded (for example a hub id to use at serve time
        instead of a local training path).
        """
        if isinstance(source, PreTrainedConfig):
            archs = list(source.architectures or [])
            recorded = name_or_path or source.name_or_path or None
        else:
            folder = Path(source)
            cfg_path = folder / CONFIG_NAME
            if not cfg_path.is_file():
                raise ConfigError(f"verifier '{folder}' has no {CONFIG_NAME}; pass a model folder")
            data = read_config_dict(cfg_path)
            archs = list(data.get("architectures") or [])
            recorded = name_or_path or str(folder.resolve())
        return cls(name_or_path=recorded, architectures=archs)


class TokenProposalConfig(BaseModel):
    """Base of the ``proposal_methods`` entries, discriminated by ``proposal_type``.

    Proposal methods are registered through the ``speculators_register_proposal_methods`` hook;
    the core's ``greedy`` method is one of them.
    """

    model_config = ConfigDict(extra="allow")

    proposal_type: str


class GreedyTokenProposalConfig(TokenProposalConfig):
    """Chain drafting of ``speculative_tokens`` tokens, each the draft's argmax.

    vLLM reads ``speculative_tokens`` as ``num_speculative_tokens``; the other two fields are
    informational (kept for compatibility with upstream checkpoints).
    """

    proposal_type: Literal["greedy"] = "greedy"
    speculative_tokens: int = Field(default=5, ge=1)
    verifier_accept_k: int = Field(default=1, ge=1)
    accept_tolerance: float = 0.0


#: Key of the pydantic validation context that resolves ``proposal_type`` to a config class: a
#: callable ``(proposal_type) -> type[TokenProposalConfig]`` raising ``ValueError`` for unknown
#: types. :func:`speculators_core.loading.validation_context` builds one from a plugin host.
PROPOSAL_RESOLVER = "proposal_class"

#: The proposal methods the core itself defines, known without any plugin host.
_CORE_PROPOSALS: dict[str, type[TokenProposalConfig]] = {"greedy": GreedyTokenProposalConfig}


def _core_proposal_class(name: str) -> type[TokenProposalConfig]:
    if name in _CORE_PROPOSALS:
        return _CORE_PROPOSALS[name]
    raise ValueError(
        f"proposal method '{name}' is not one of the core's ({', '.join(sorted(_CORE_PROPOSALS))}); "
        "pass its config object, or validate with speculators_core.loading.validation_context(host) "
        "to use the plugins' proposal methods"
    )


def _validate_proposals(
    value: list[Any], info: pydantic.ValidationInfo
) -> list[TokenProposalConfig]:
    """Validate each entry with the config class its ``proposal_type`` names.

    The class comes from the validation context's resolver (a plugin host's proposal methods,
    see :mod:`speculators_core.loading`); without one, an entry that is already a config object
    keeps its own class and a raw entry must name one of the core's methods.
    """
    resolver = (info.context or {}).get(PROPOSAL_RESOLVER, _core_proposal_class)
    # Every entry goes through the class registered for its proposal_type (built entries are
    # re-validated from their dump), so errors carry the entry index
    # (proposal_methods.0.speculative_tokens).
    entries: list[Any] = []
    classes: dict[str, type[TokenProposalConfig]] = {}
    for entry in value:
        if isinstance(entry, TokenProposalConfig):
            classes.setdefault(entry.proposal_type, type(entry))
            entry = entry.model_dump()
        elif not isinstance(entry, Mapping) or not isinstance(entry.get("proposal_type"), str):
            raise ValueError("each proposal method must be an object with a string 'proposal_type'")
        elif entry["proposal_type"] not in classes:
            classes[entry["proposal_type"]] = resolver(entry["proposal_type"])
        entries.append(entry)
    choices = tuple(dict.fromkeys(classes.values()))
    if not choices:
        return []
    item: Any = choices[0]
    if len(choices) > 1:
        item = typing.Annotated[
            typing.Union[choices],  # noqa: UP007 - built from a runtime tuple
            Field(discriminator="proposal_type"),
        ]
    return pydantic.TypeAdapter(list[item]).validate_python(entries)


class SpeculatorsConfig(BaseModel):
    """The ``speculators_config`` object: algorithm, proposal methods, verifier."""

    model_config = ConfigDict(extra="allow")

    algorithm: str
    proposal_methods: list[SerializeAsAny[TokenProposalConfig]] = Field(min_length=1)
    default_proposal_method: str
    verifier: VerifierConfig

    @pydantic.field_validator("proposal_methods", mode="before")
    @classmethod
    def _resolve_proposals(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        if not isinstance(value, list):
            return value
        return _validate_proposals(value, info)

    @pydantic.model_validator(mode="after")
    def _default_is_listed(self) -> SpeculatorsConfig:
        kinds = [p.proposal_type for p in self.proposal_methods]
        if self.default_proposal_method not in kinds:
            raise ValueError(
                f"default_proposal_method '{self.default_proposal_method}' is not one of the "
                f"proposal_methods ({', '.join(kinds)})"
            )
        return self

    def default_proposal(self) -> TokenProposalConfig:
        """The entry named by ``default_proposal_method``."""
        for p in self.proposal_methods:
            if p.proposal_type == self.default_proposal_method:
                return p
        raise AssertionError("validated on construction")  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# Nested transformers config of the draft decoder
# ------------------------------------------------------------------------------------------------


def layer_config_from_dict(
    value: Mapping[str, Any] | PreTrainedConfig, default_model_type: str
) -> PreTrainedConfig:
    """Turn a ``transformer_layer_config`` dict into the transformers config class it names.

    The class is chosen by the dict's ``model_type`` (``llama``, ``qwen3``, ...), falling back
    to ``default_model_type``.
    """
    if isinstance(value, PreTrainedConfig):
        return value
    from transformers import AutoConfig

    data = dict(value)
    model_type = data.pop("model_type", None) or default_model_type
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ConfigError(
            f"transformer_layer_config: unknown model_type '{model_type}' ({err}); use 'llama' or 'qwen3'"
        ) from err


# ------------------------------------------------------------------------------------------------
# The top-level config
# ------------------------------------------------------------------------------------------------

# Set while from_dict builds a config from values it has just validated, so construction does
# not validate them a second time (a ContextVar, so concurrent loads do not interfere).
_VALIDATED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "speculators_config_validated", default=False
)

# HF base keys written to config.json besides the speculator fields (FORMAT.md 1.2).
_HF_KEYS_KEPT = ("architectures", "transformers_version", "dtype")
# Keys never written, even when a loaded file carried them.
_DROPPED_KEYS = frozenset(
    {
        "model_type",
        "auto_map",  # would point at a Python file this project does not write
        "has_no_defaults_at_init",
        "torch_dtype",  # transformers 5 writes "dtype"
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "_attn_implementation_internal",
        "_attn_implementation_autoset",
        "_experts_implementation_internal",
    }
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, PreTrainedConfig):
        data = value.to_diff_dict()
        data.pop("transformers_version", None)
        return data
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return list(value)
    return value


class SpeculatorModelConfig(PreTrainedConfig):
    """Base config of every speculator, serialized as the speculators format.

    Subclasses (one per algorithm) set ``speculators_model_type: str = "<name>"`` and declare
    their own fields; all of them are validated by pydantic on construction and on load, and
    written to ``config.json`` together with ``speculators_config``.
    """

    # Internal transformers registry key; never written (vLLM needs model_type absent).
    model_type: ClassVar[str] = "speculator"

    speculators_model_type: str = ""
    speculators_version: str = dataclasses.field(default_factory=core_version)
    speculators_config: SpeculatorsConfig | dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        declared = type(self).__dict__.get("speculators_model_type", None)
        # Unknown keys from a loaded file are kept (upstream's extra="allow"), minus the ones
        # that must never be written back.
        for key in _DROPPED_KEYS & kwargs.keys():
            kwargs.pop(key)
        super().__post_init__(**kwargs)
        if isinstance(declared, str) and declared and self.speculators_model_type != declared:
            raise ConfigError(
                f"config: speculators_model_type is '{self.speculators_model_type}' but "
                f"{type(self).__name__} is for '{declared}'"
            )
        if self.speculators_config is not None and not _VALIDATED.get():
            self._validate_fields()

    # -------------------------------------------------------------- schema

    @classmethod
    def speculator_field_names(cls) -> list[str]:
        """Fields this class adds to ``PreTrainedConfig`` (all written to ``config.json``)."""
        base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        return [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in base and not f.name.startswith("_")
        ]

    @classmethod
    def pydantic_schema(cls) -> type[BaseModel]:
        """A pydantic model validating this class's fields (cached per class)."""
        cached = cls.__dict__.get("_pydantic_schema_cache")
        if cached is not None:
            return typing.cast(type[BaseModel], cached)
        hints = _own_type_hints(cls)
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        spec: dict[str, Any] = {}
        for name in cls.speculator_field_names():
            field = defaults[name]
            annotation = hints.get(name, Any)
            if name == "speculators_model_type":
                declared = field.default
                annotation = Literal[declared] if isinstance(declared, str) and declared else str
                spec[name] = (annotation, ...)
            elif name == "speculators_config":
                spec[name] = (SpeculatorsConfig, ...)
            elif field.default is not dataclasses.MISSING:
                spec[name] = (annotation, field.default)
            elif field.default_factory is not dataclasses.MISSING:
                spec[name] = (annotation, Field(default_factory=field.default_factory))
            else:
                spec[name] = (annotation, ...)
        schema = pydantic.create_model(
            f"{cls.__name__}Schema",
            __config__=ConfigDict(
                extra="allow", arbitrary_types_allowed=True, validate_default=False
            ),
            **spec,
        )
        cls._pydantic_schema_cache = schema  # type: ignore[attr-defined]
        return schema

    @classmethod
    def validate_dict(
        cls,
        data: Mapping[str, Any],
        *,
        where: str = "config",
        context: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Validate a raw config dict against this class's schema; return the coerced values.

        ``context`` is the pydantic validation context (see
        :func:`speculators_core.loading.validation_context` to resolve plugins' proposal
        methods). Raises :class:`ConfigError` with one line naming the first bad field.
        """
        fields = {k: v for k, v in data.items() if k in cls.speculator_field_names()}
        try:
            validated = cls.pydantic_schema().model_validate(fields, context=dict(context or {}))
        except pydantic.ValidationError as err:
            raise ConfigError(format_validation_error(err, where=where)) from err
        return {name: getattr(validated, name) for name in fields}

    def _validate_fields(self) -> None:
        current = {name: getattr(self, name) for name in self.speculator_field_names()}
        for name, value in self.validate_dict(current).items():
            object.__setattr__(self, name, value)

    # -------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """The speculators-format dict: speculator fields, kept HF keys and extras; no ``model_type``."""
        out: dict[str, Any] = {}
        base_fields = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        own = set(self.speculator_field_names())
        for key, value in self.__dict__.items():
            if key.startswith("_") or key in _DROPPED_KEYS:
                continue
            if key in base_fields and key not in _HF_KEYS_KEPT:
                continue
            if key not in own and key not in _HF_KEYS_KEPT and not _is_plain_json(value):
                continue
            out[key] = _jsonable(value)
        for key in own:
            out[key] = _jsonable(getattr(self, key))
        if out.get("dtype") is None:
            out.pop("dtype", None)
        from transformers import __version__ as tf_version

        out["transformers_version"] = tf_version
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> dict[str, Any]:
        """Same as :meth:`to_dict`: the format writes every speculator field explicitly."""
        return self.to_dict()

    # -------------------------------------------------------------- loading

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Build from a raw dict (as read from ``config.json``), validated once.

        ``where`` (a keyword, default ``"config"``) names the source in error messages. Raw
        ``proposal_methods`` entries must name one of the core's methods; to resolve the
        plugins' methods too, load with :func:`speculators_core.loading.load_config`.
        """
        where = kwargs.pop("where", "config")
        data = dict(config_dict)
        data.pop("model_type", None)
        data.update(cls.validate_dict(data, where=where))
        token = _VALIDATED.set(True)  # construction must not validate the same values again
        try:
            return super().from_dict(data, **kwargs)
        finally:
            _VALIDATED.reset(token)


def _own_type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the speculator classes in ``cls``'s MRO (not transformers')."""
    import sys

    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, SpeculatorModelConfig)):
            continue
        module_globals = vars(sys.modules[klass.__module__])
        for name, annotation in inspect.get_annotations(klass).items():
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, module_globals, dict(vars(typing)))
                except NameError:
                    annotation = Any
            hints[name] = annotation
    return hints


def _is_plain_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def read_config_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``config.json`` with a one-line error for missing files and bad JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no {CONFIG_NAME} at '{path.parent}'; pass a speculator folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"'{path}' is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); fix or re-save it"
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a JSON object, found {type(data).__name__}")
    return data
