"""Options given as ``KEY=VALUE`` text, and the typed training options an algorithm declares.

Every ``KEY=VALUE`` flag of the CLI (``speculators train --algo-opt``, ``speculators quickstart
--algo-opt``, ``speculators convert --set``) is read by :func:`parse_key_value`, so they all
accept the same spelling (dashes or underscores in the key, everything after the first ``=`` is
the value) and fail with the same one-line error.

An algorithm lists what its ``from_verifier`` accepts as :class:`TrainingOption` records
(``Algorithm.training_options``). :func:`resolve_training_options` checks the options a run was
given against that list: an unknown name is refused with the list of valid ones, and each value
is converted to its declared type (the text ``3`` becomes the int ``3``) before it reaches the
model. An algorithm that declares no options keeps the permissive behaviour: command-line
values are read as JSON when they parse (``3``, ``true``, ``[2,15,27]``), else kept as strings,
and nothing is refused before ``from_verifier`` sees them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from speculators_core.errors import SpeculatorsError

if TYPE_CHECKING:
    from speculators_core.plugins.records import Algorithm

__all__ = [
    "OptionError",
    "OptionText",
    "TrainingOption",
    "describe_training_options",
    "int_list",
    "json_or_text",
    "parse_key_value",
    "parse_key_values",
    "positive_ints",
    "python_value",
    "resolve_training_options",
]


class OptionError(SpeculatorsError, ValueError):
    """An option is malformed, unknown to the algorithm, or of the wrong type."""


class OptionText(str):
    """A value exactly as typed on the command line, not yet converted to its option's type.

    Command-line values are kept as text until the algorithm is known: a declared option then
    parses the text with its own type (``verifier_name_or_path=123`` stays the string ``"123"``),
    an undeclared one falls back to :func:`json_or_text`. Values from config files and Python
    callers are already typed and are not ``OptionText``.
    """

    __slots__ = ()


#: What :attr:`TrainingOption.type` may be: one of ``int``, ``float``, ``str``, ``bool``, or a
#: parser that turns a value (command-line text or an already-typed value) into the option's
#: value and raises ``ValueError``/``TypeError`` when it cannot.
OptionType = type[int] | type[float] | type[str] | type[bool] | Callable[[Any], Any]

_SCALAR_TYPES: tuple[type, ...] = (int, float, str, bool)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class TrainingOption:
    """One keyword option of an algorithm's ``from_verifier`` (what ``--algo-opt`` may set).

    ``type`` converts a given value: ``int``, ``float``, ``str`` or ``bool`` (command-line text is
    parsed; ``true``/``false``, ``1``/``0``, ``yes``/``no`` for booleans), or a parser callable
    such as :func:`int_list`. ``default`` is what ``from_verifier`` uses when the option is not
    given (shown in ``speculators train --help``; ``None`` when the algorithm derives it).
    ``choices``, when not empty, lists the allowed values (after conversion).
    """

    name: str
    type: OptionType
    default: Any = None
    help: str = ""
    choices: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise OptionError(
                f"training option name '{self.name}' is not a Python identifier; name it like "
                "the from_verifier keyword it sets"
            )
        if not callable(self.type):
            raise OptionError(
                f"training option '{self.name}' has type {self.type!r}; use int, float, str, "
                "bool or a parser function"
            )

    @property
    def type_name(self) -> str:
        """The type as users read it: ``int``, ``float``, ``str``, ``bool`` or the parser's name."""
        return str(getattr(self.type, "__name__", repr(self.type)))

    def convert(self, value: Any, *, algorithm: str = "") -> Any:
        """``value`` as this option's type; an :class:`OptionError` naming option, value and type.

        ``None`` stays ``None`` (it means "use the algorithm's default").
        """
        if value is None:
            return None
        try:
            converted = self._convert(value)
        except (TypeError, ValueError) as err:
            owner = f" of algorithm '{algorithm}'" if algorithm else ""
            why = f" ({err})" if str(err) and self.type not in _SCALAR_TYPES else ""
            raise OptionError(
                f"training option '{self.name}'{owner} must be {self.type_name}, not {value!r}"
                f"{why}; e.g. --algo-opt {self.name}={self._example()}"
            ) from None
        if self.choices and converted not in self.choices:
            raise OptionError(
                f"training option '{self.name}' must be one of "
                f"{', '.join(map(str, self.choices))}, not {value!r}"
            )
        return converted

    def _convert(self, value: Any) -> Any:
        kind = self.type
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError("not a boolean")
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError("not an integer")
            return int(value)  # int("3.5") raises ValueError, as it should
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError("not a number")
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise TypeError("not a string")
            return str(value)  # drop the OptionText marker
        return kind(value)

    def _example(self) -> str:
        if self.default is not None and not isinstance(self.default, (list, tuple, dict)):
            return (
                str(self.default).lower() if isinstance(self.default, bool) else str(self.default)
            )
        return {"int": "3", "float": "0.5", "bool": "true", "int_list": "[2,4,6]"}.get(
            self.type_name, "VALUE"
        )


# ------------------------------------------------------------------------------------------
# parsers for option types
# ------------------------------------------------------------------------------------------


def int_list(value: Any) -> list[int]:
    """A list of ints from ``[2, 4, 6]`` (JSON), ``2,4,6`` (text) or a Python sequence."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)  # json.JSONDecodeError is a ValueError
        else:
            value = [part for part in text.split(",") if part.strip()]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError("not a list of integers")
    items = list(value)
    if any(isinstance(item, (bool, float)) for item in items):
        raise ValueError("not a list of integers")
    return [int(item) for item in items]


def positive_ints(text: str, option: str) -> list[int]:
    """``1,2,3`` as sorted distinct positive ints; one line naming ``option`` otherwise."""
    try:
        values = int_list(text)
    except (TypeError, ValueError):
        values = []
    if not values or min(values) < 1:
        raise SpeculatorsError(
            f"{option} takes positive integers separated by commas, got '{text}'"
        )
    return sorted(set(values))


def python_value(value: Any) -> Any:
    """Any Python value (a tensor, a mapping), passed through; command-line text is refused.

    For options only a Python caller or a config file can give (the draft vocabulary as
    tensors); on the command line the core's own flags (``--vocab``) set them.
    """
    if isinstance(value, OptionText):
        raise ValueError("it cannot be given as text; set it from Python or a config file")
    return value


# ------------------------------------------------------------------------------------------
# KEY=VALUE text
# ------------------------------------------------------------------------------------------


def parse_key_value(text: str, *, flag: str, example: str) -> tuple[str, OptionText]:
    """``"ttt-steps=3"`` -> ``("ttt_steps", OptionText("3"))``: the one ``KEY=VALUE`` reader.

    The key's dashes become underscores (keys name Python keywords); the value is everything
    after the first ``=``, unconverted. ``flag`` and ``example`` (``ttt_steps=3``) go into the
    one-line error for text without ``=`` or without a key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise OptionError(f"{flag} '{text}' is not KEY=VALUE; write e.g. {flag} {example}")
    return key, OptionText(raw)


def parse_key_values(pairs: Iterable[str], *, flag: str, example: str) -> dict[str, OptionText]:
    """Several ``KEY=VALUE`` texts (a repeated flag) -> a dict; a later key wins."""
    return dict(parse_key_value(pair, flag=flag, example=example) for pair in pairs)


def json_or_text(value: Any) -> Any:
    """Command-line text read as JSON (``3``, ``true``, ``[2,15,27]``, ``null``), else kept as a
    plain string; a value that is not :class:`OptionText` (already typed) is returned as is."""
    if not isinstance(value, OptionText):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return str(value)


# ------------------------------------------------------------------------------------------
# checking options against an algorithm
# ------------------------------------------------------------------------------------------


def resolve_training_options(algorithm: Algorithm, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` checked against ``algorithm.training_options`` and converted to their types.

    Keys may use dashes. An unknown name or a value that does not convert is one
    :class:`OptionError` line. An algorithm without declared options gets every value through
    (command-line text read by :func:`json_or_text`), as before options were declared.
    """
    declared = {option.name: option for option in algorithm.training_options}
    resolved: dict[str, Any] = {}
    for key, value in given.items():
        name = key.replace("-", "_")
        if not declared:
            resolved[name] = json_or_text(value)
            continue
        option = declared.get(name)
        if option is None:
            raise OptionError(
                f"algorithm '{algorithm.name}' has no training option '{key}'; its options: "
                f"{', '.join(sorted(declared))} (see 'speculators train --help')"
            )
        resolved[name] = option.convert(value, algorithm=algorithm.name)
    return resolved


def _shown(value: Any) -> str:
    """A default as the user would type it (``unset`` for ``None``)."""
    if value is None:
        return "unset"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # not JSON (a tensor): its repr still tells what it is
        return repr(value)


def describe_training_options(algorithm: Algorithm) -> list[str]:
    """One line per declared option: ``name (type, default X): help [choices: ...]``."""
    lines = []
    for option in algorithm.training_options:
        text = f"{option.name} ({option.type_name}, default {_shown(option.default)})"
        if option.help:
            text += f": {option.help}"
        if option.choices:
            text += f" [choices: {', '.join(map(str, option.choices))}]"
        lines.append(text)
    return lines
