"""The plugin host: stevedore finds and loads entry points, pluggy registers and calls them.

There is exactly one discovery path. For each hook group, a stevedore ``NamedExtensionManager``
imports the allowed entry points one by one (a broken one is recorded, logged once and skipped);
each loaded object is registered once with a pluggy ``PluginManager`` under the name
``"<group>:<entry-point name>"``. Everything else (the algorithm table, the config union, the
transformers Auto-class registrations) is derived from the host, never kept as a second
registry.

No host is built at import time: :func:`get_host` builds the default one on first use and caches
it; tests build isolated hosts with :class:`PluginHost` directly. The config schema and the model
base class never ask for a host: code that chooses a class by name takes one
(:mod:`speculators_core.loading`).
"""

from __future__ import annotations

import functools
import importlib.metadata as importlib_metadata
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pluggy
from stevedore import NamedExtensionManager

from speculators_core.errors import PluginError, UnknownAlgorithmError
from speculators_core.plugins import hookspecs
from speculators_core.plugins.records import Algorithm, Converter, Objective, ProposalMethod

__all__ = [
    "ALL_GROUPS",
    "COMMAND_GROUP",
    "HOOK_GROUPS",
    "KNOWN_DISTRIBUTIONS",
    "EntryPointInfo",
    "LoadFailure",
    "PluginHost",
    "PluginSettings",
    "get_host",
    "list_entry_points",
    "reset_host",
]

logger = logging.getLogger(__name__)

#: Entry-point groups whose objects implement hooks and are registered with pluggy.
HOOK_GROUPS: tuple[str, ...] = (
    "speculators.algorithms",
    "speculators.converters",
    "speculators.plugins",
)
#: Entry-point group of CLI commands (click commands, imported lazily by the CLI, not hooks).
COMMAND_GROUP = "speculators.commands"
ALL_GROUPS: tuple[str, ...] = (*HOOK_GROUPS, COMMAND_GROUP)

#: Where to point users who select a well-known algorithm or converter that is not installed.
KNOWN_DISTRIBUTIONS: dict[str, str] = {
    "eagle3": "speculators-eagle3",
    "eagle": "speculators-hass",
}

ENV_STRICT = "SPECULATORS_STRICT_PLUGINS"
ENV_DISABLE = "SPECULATORS_DISABLE_PLUGINS"
ENV_LOAD = "SPECULATORS_LOAD_PLUGINS"

_BUILTIN_NAME = "speculators.core:builtin"


@dataclass(frozen=True)
class EntryPointInfo:
    """One entry point, read from installed metadata without importing anything."""

    group: str
    name: str
    value: str
    distribution: str | None
    version: str | None

    @property
    def key(self) -> str:
        """The name the plugin is registered under with pluggy: ``"<group>:<name>"``."""
        return f"{self.group}:{self.name}"

    @property
    def provided_by(self) -> str:
        """``"<distribution> <version>"``, or ``"an unknown distribution"``."""
        if self.distribution is None:
            return "an unknown distribution"
        return f"{self.distribution} {self.version}" if self.version else self.distribution


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be imported or registered."""

    entry_point: EntryPointInfo
    error: BaseException

    @property
    def message(self) -> str:
        """The one-line warning, e.g. ``could not load plugin speculators.algorithms:hass (...)``."""
        return (
            f"could not load plugin {self.entry_point.key} ({self.entry_point.provided_by}): "
            f"{self.error!r}"
        )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _name_set(value: str | None) -> frozenset[str]:
    return frozenset(part.strip() for part in (value or "").split(",") if part.strip())


@dataclass(frozen=True)
class PluginSettings:
    """Which plugins to load and how strictly.

    ``disabled`` and ``enabled`` hold names that match an entry point by its name (``hass``),
    its ``group:name`` key, or its distribution name (``speculators-hass``). With ``enabled``
    set, only matching entry points load. ``strict`` turns load failures into errors (for CI).
    """

    strict: bool = False
    disabled: frozenset[str] = frozenset()
    enabled: frozenset[str] | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PluginSettings:
        """Read ``SPECULATORS_STRICT_PLUGINS``, ``SPECULATORS_DISABLE_PLUGINS``, ``SPECULATORS_LOAD_PLUGINS``."""
        env = os.environ if environ is None else environ
        enabled_raw = env.get(ENV_LOAD)
        return cls(
            strict=_truthy(env.get(ENV_STRICT)),
            disabled=_name_set(env.get(ENV_DISABLE)),
            enabled=_name_set(enabled_raw) if enabled_raw is not None else None,
        )

    @staticmethod
    def _matches(names: frozenset[str], info: EntryPointInfo) -> bool:
        return bool(names & {info.name, info.key, info.distribution or ""})

    def blocked_reason(self, info: EntryPointInfo) -> str | None:
        """Why ``info`` is not loaded under these settings, or None when it is allowed."""
        if self._matches(self.disabled, info):
            return f"disabled by {ENV_DISABLE}"
        if self.enabled is not None and not self._matches(self.enabled, info):
            return f"not in {ENV_LOAD}"
        return None


def _distribution_of(ep: importlib_metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def list_entry_points(groups: Iterable[str] = ALL_GROUPS) -> list[EntryPointInfo]:
    """All speculators entry points in ``groups``, from metadata only (nothing is imported).

    This is what ``speculators plugins`` lists, so it works even when plugins are broken.
    """
    found: list[EntryPointInfo] = []
    seen: set[tuple[str, str, str, str | None]] = set()
    for group in groups:
        for ep in importlib_metadata.entry_points(group=group):
            dist, version = _distribution_of(ep)
            ident = (group, ep.name, ep.value, dist)
            if ident in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ident)
            found.append(EntryPointInfo(group, ep.name, ep.value, dist, version))
    return sorted(found, key=lambda i: (i.group, i.name, i.distribution or ""))


R = TypeVar("R", Algorithm, ProposalMethod, Converter, Objective)


class PluginHost:
    """Discovers, loads and registers plugins; answers lookups derived from their hooks.

    Loading is lazy: nothing is imported until the first lookup. Pass ``plugins`` (pairs of a
    name and an object with hook implementations) to register extra plugins directly, which is
    how tests build isolated hosts; ``entry_points=False`` skips discovery altogether.
    """

    def __init__(
        self,
        settings: PluginSettings | None = None,
        *,
        entry_points: bool = True,
        builtins: bool = True,
        plugins: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.settings = settings if settings is not None else PluginSettings.from_env()
        self._use_entry_points = entry_points
        self._use_builtins = builtins
        self._extra = list(plugins)
        self._pm: pluggy.PluginManager | None = None
        self._provenance: dict[str, str] = {}
        self._infos: dict[str, EntryPointInfo] = {}
        self.failures: dict[str, LoadFailure] = {}
        self.blocked: dict[str, str] = {}
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading

    @property
    def pm(self) -> pluggy.PluginManager:
        """The pluggy manager, with every allowed plugin registered (loads on first access)."""
        if self._pm is None:
            self._pm = self._build()
        return self._pm

    def _build(self) -> pluggy.PluginManager:
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        if self._use_builtins:
            from speculators_core.plugins import builtin

            self._register(pm, _BUILTIN_NAME, builtin, "speculators-core (built in)")
        for name, obj in self._extra:
            self._register(pm, name, obj, f"plugin {name}")
        if self._use_entry_points:
            self._load_entry_points(pm)
        self._check_pending(pm)
        return pm

    def _check_pending(self, pm: pluggy.PluginManager) -> None:
        """Refuse plugins that implement hooks no spec defines (typos, stale hook names)."""
        while True:
            try:
                pm.check_pending()
                return
            except pluggy.PluginValidationError as err:
                name = pm.get_name(err.plugin) or "?"
                info = self._infos.get(name)
                if info is None:  # a built-in or directly registered plugin: a programming error
                    raise PluginError(f"plugin {name}: {err}") from err
                pm.unregister(err.plugin)
                self._fail(info, err)

    def _register(self, pm: pluggy.PluginManager, name: str, obj: object, provided_by: str) -> None:
        pm.register(obj, name=name)
        self._provenance[name] = provided_by

    def _fail(self, info: EntryPointInfo, error: BaseException) -> None:
        failure = LoadFailure(info, error)
        if self.settings.strict:
            raise PluginError(f"{failure.message} ({ENV_STRICT} is set)") from error
        self.failures[info.key] = failure
        logger.warning("%s", failure.message)

    def _load_entry_points(self, pm: pluggy.PluginManager) -> None:
        infos = list_entry_points(HOOK_GROUPS)
        by_ident: dict[tuple[str, str, str], list[EntryPointInfo]] = {}
        for info in infos:
            by_ident.setdefault((info.group, info.name, info.value), []).append(info)
            reason = self.settings.blocked_reason(info)
            if reason is not None:
                self.blocked[info.key] = reason
        for group in HOOK_GROUPS:
            allowed = [i.name for i in infos if i.group == group and i.key not in self.blocked]
            if not allowed:
                continue

            def on_failure(
                _mgr: Any, ep: importlib_metadata.EntryPoint, err: BaseException
            ) -> None:
                candidates = by_ident.get((ep.group, ep.name, ep.value)) or [
                    EntryPointInfo(ep.group, ep.name, ep.value, None, None)
                ]
                self._fail(candidates[0], err)

            manager: NamedExtensionManager[Any] = NamedExtensionManager(
                namespace=group,
                names=sorted(set(allowed)),
                invoke_on_load=False,
                on_load_failure_callback=on_failure,
            )
            for ext in manager.extensions:
                ep = ext.entry_point
                candidates = by_ident.get((ep.group, ep.name, ep.value)) or [
                    EntryPointInfo(ep.group, ep.name, ep.value, None, None)
                ]
                info = candidates[0]
                key = info.key
                if pm.has_plugin(key):
                    # Two distributions use the same entry-point name in one group: keep both
                    # registered under distinct names so the record check names both.
                    key = f"{key}#{info.distribution}"
                self._infos[key] = info
                try:
                    self._register(pm, key, ext.plugin, info.provided_by)
                except (pluggy.PluginValidationError, ValueError) as err:
                    self._fail(info, err)

    # ------------------------------------------------------------------ records

    def _collect(self, hook_name: str, kind: str, **kwargs: Any) -> list[Any]:
        """Call one registration hook per plugin, so every record knows who provided it."""
        caller = getattr(self.pm.hook, hook_name)
        results: list[Any] = []
        # pluggy returns implementations in registration order, last-registered first when
        # called; keep registration order for stable listings.
        for impl in caller.get_hookimpls():
            provided_by = self._provenance.get(impl.plugin_name, impl.plugin_name)
            try:
                records = impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})
            except Exception as err:
                info = self._infos.get(impl.plugin_name)
                if info is None:
                    raise PluginError(
                        f"plugin {impl.plugin_name} ({provided_by}) failed in {hook_name}: {err!r}"
                    ) from err
                self._fail(info, err)
                continue
            for record in records or ():
                results.append((record, provided_by, impl.plugin_name))
        return results

    def _records(self, hook_name: str, kind: str, record_type: type[R]) -> dict[str, R]:
        if hook_name in self._cache:
            return dict(self._cache[hook_name])
        table: dict[str, R] = {}
        for record, provided_by, plugin_name in self._collect(hook_name, kind):
            if not isinstance(record, record_type):
                raise PluginError(
                    f"plugin {plugin_name} ({provided_by}) returned {type(record).__name__} from "
                    f"{hook_name}; expected {record_type.__name__} records"
                )
            if record.name in table:
                other = table[record.name].provided_by
                raise PluginError(
                    f"{kind} '{record.name}' is provided twice: by {other} and by {provided_by}; "
                    "uninstall one of them or block one with "
                    f"{ENV_DISABLE}"
                )
            table[record.name] = replace(record, provided_by=provided_by)
        self._cache[hook_name] = table
        return dict(table)

    def algorithms(self) -> dict[str, Algorithm]:
        """Installed algorithms by ``speculators_model_type``."""
        table = self._records("speculators_register_algorithms", "algorithm", Algorithm)
        if "algorithms_checked" not in self._cache:
            for algo in table.values():
                _check_algorithm(algo)
            self._cache["algorithms_checked"] = True
        return table

    def proposal_methods(self) -> dict[str, ProposalMethod]:
        """Installed token-proposal methods by ``proposal_type``."""
        return self._records(
            "speculators_register_proposal_methods", "proposal method", ProposalMethod
        )

    def converters(self) -> dict[str, Converter]:
        """Installed checkpoint converters by name."""
        return self._records("speculators_register_converters", "converter", Converter)

    def objectives(self) -> dict[str, Objective]:
        """Installed training objectives by name (the core's and the plugins')."""
        return self._records("speculators_register_objectives", "objective", Objective)

    def _missing(
        self, kind: str, name: str, group: str | None, installed: Iterable[str]
    ) -> PluginError:
        """The error for selecting ``name`` of ``kind`` that no loaded plugin provides."""
        names = ", ".join(sorted(installed)) or "none"
        for failure in self.failures.values():
            if failure.entry_point.name == name and (
                group is None or failure.entry_point.group == group
            ):
                err = PluginError(
                    f"{kind} '{name}' is provided by {failure.entry_point.provided_by}, which failed "
                    f"to load: {failure.error!r}; fix or reinstall it (see 'speculators plugins')"
                )
                err.__cause__ = failure.error
                return err
        for key, reason in self.blocked.items():
            if key.split(":", 1)[1] == name and (group is None or key.startswith(group + ":")):
                return PluginError(
                    f"{kind} '{name}' is provided by plugin {key}, which is {reason}"
                )
        hint = KNOWN_DISTRIBUTIONS.get(name)
        install = f"install {hint}" if hint else "install the distribution that provides it"
        message = f"no installed plugin provides {kind} '{name}' (installed: {names}); {install}"
        return UnknownAlgorithmError(message) if kind == "algorithm" else PluginError(message)

    def algorithm(self, name: str) -> Algorithm:
        """The algorithm called ``name``; a clear error if it is missing, broken or blocked."""
        table = self.algorithms()
        if name not in table:
            raise self._missing("algorithm", name, "speculators.algorithms", table)
        return table[name]

    def proposal_method(self, name: str) -> ProposalMethod:
        """The proposal method called ``name``, or a clear error."""
        table = self.proposal_methods()
        if name not in table:
            raise self._missing("proposal method", name, None, table)
        return table[name]

    def converter(self, name: str) -> Converter:
        """The converter called ``name``, or a clear error."""
        table = self.converters()
        if name not in table:
            raise self._missing("converter", name, "speculators.converters", table)
        return table[name]

    def objective(self, name: str) -> Objective:
        """The objective called ``name``, or a clear error listing the installed ones."""
        table = self.objectives()
        if name not in table:
            raise self._missing("objective", name, None, table)
        return table[name]

    def training_callbacks(self, args: Any) -> list[Any]:
        """Callbacks that plugins contribute to a training run (asked once per run)."""
        return [
            cb
            for cb, _who, _plugin in self._collect(
                "speculators_training_callbacks", "callback", args=args
            )
        ]

    # ------------------------------------------------------------------ derived views

    def plugin_names(self) -> list[str]:
        """Names of all registered plugins (``"<group>:<name>"``)."""
        return [name for name, _ in self.pm.list_name_plugin()]

    def provided_by(self, plugin_name: str) -> str:
        """``"<distribution> <version>"`` of a registered plugin."""
        return self._provenance.get(plugin_name, plugin_name)

    def hooks_of(self, plugin_name: str) -> list[str]:
        """The hooks a registered plugin implements."""
        plugin = self.pm.get_plugin(plugin_name)
        callers = self.pm.get_hookcallers(plugin) or []
        return sorted(c.name for c in callers)

    def config_union(self) -> Any:
        """A pydantic ``TypeAdapter`` over all installed algorithms' config schemas.

        The union is discriminated by ``speculators_model_type`` and rebuilt from the host's
        algorithm table, never kept as a second registry.
        """
        if "config_union" not in self._cache:
            import typing

            import pydantic

            schemas = tuple(a.config_class.pydantic_schema() for a in self.algorithms().values())
            if not schemas:
                raise UnknownAlgorithmError(
                    "no speculator algorithm is installed; install speculators-eagle3 or another plugin"
                )
            if len(schemas) == 1:
                union: Any = schemas[0]
            else:
                union = typing.Annotated[
                    typing.Union[schemas],  # noqa: UP007 - built from a runtime tuple
                    pydantic.Field(discriminator="speculators_model_type"),
                ]
            self._cache["config_union"] = pydantic.TypeAdapter(union)
        return self._cache["config_union"]


def _check_algorithm(algo: Algorithm) -> None:
    from speculators_core.config import SpeculatorModelConfig
    from speculators_core.model import SpeculatorModel

    if not (
        isinstance(algo.config_class, type) and issubclass(algo.config_class, SpeculatorModelConfig)
    ):
        raise PluginError(
            f"algorithm '{algo.name}' ({algo.provided_by}): config_class must subclass SpeculatorModelConfig"
        )
    if not (isinstance(algo.model_class, type) and issubclass(algo.model_class, SpeculatorModel)):
        raise PluginError(
            f"algorithm '{algo.name}' ({algo.provided_by}): model_class must subclass SpeculatorModel"
        )
    declared = algo.config_class.speculators_model_type
    if declared != algo.name:
        raise PluginError(
            f"algorithm '{algo.name}' ({algo.provided_by}): its config class declares "
            f"speculators_model_type '{declared}'; the two must match"
        )


@functools.lru_cache(maxsize=1)
def get_host() -> PluginHost:
    """The process-wide host, built on first use from the environment's settings."""
    return PluginHost()


def reset_host() -> None:
    """Forget the cached host (the next :func:`get_host` builds a new one)."""
    get_host.cache_clear()
