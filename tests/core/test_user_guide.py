"""docs/user-guide.md follows the CLI: a section per command, every long option named in it.

The real click tree of ``speculators`` is walked in-process (built-in commands are imported
lazily by the root group's ``get_command``; plugin commands come from the installed entry
points). A command heading is a Markdown heading that holds exactly the command path in
backticks, e.g. ``### `speculators data prepare```; its section runs to the next heading of the
same or a higher level. Plugin commands are required only when they come from a distribution of
this repository (``plugins/*``); third-party plugins document themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from speculators_core.cli.main import BUILTIN_COMMANDS, cli

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "user-guide.md"
ROOT = "speculators"

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_COMMAND_HEADING = re.compile(r"^`(speculators(?: [a-z0-9][a-z0-9-]*)*)`$")


@dataclass(frozen=True)
class Section:
    """One command heading of the guide and the text under it."""

    path: str
    level: int
    anchor: str
    text: str


@dataclass(frozen=True)
class CommandInfo:
    """One command of the live CLI: its path, long option names and whether it must be documented."""

    path: str
    long_options: tuple[str, ...]
    required: bool
    unavailable: bool


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def parse_sections(markdown: str) -> dict[str, Section]:
    """Command sections of a guide, keyed by command path; a path given twice is an error."""
    lines = markdown.splitlines()
    headings: list[tuple[int, int, str]] = []  # (line index, level, title)
    in_fence = False
    for index, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        match = None if in_fence else _HEADING.match(line)
        if match:
            headings.append((index, len(match.group(1)), match.group(2)))
    sections: dict[str, Section] = {}
    for position, (index, level, title) in enumerate(headings):
        command = _COMMAND_HEADING.match(title)
        if command is None:
            continue
        end = len(lines)
        for later_index, later_level, _ in headings[position + 1 :]:
            if later_level <= level:
                end = later_index
                break
        path = command.group(1)
        if path in sections:
            raise AssertionError(f"the guide has two sections for '{path}'")
        sections[path] = Section(
            path=path,
            level=level,
            anchor=github_anchor(title),
            text="\n".join(lines[index + 1 : end]),
        )
    return sections


def mentions_option(text: str, option: str) -> bool:
    """Whether ``text`` names ``option`` as a whole word (``--seed`` is not in ``--seed-x``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def repository_plugin_commands() -> dict[str, str]:
    """Command name -> distribution of the plugin commands of this repository's ``plugins/*``.

    Read from the TOML text with two patterns (``tomllib`` is not in Python 3.10): the
    ``[project]`` table's ``name`` and the keys of ``[project.entry-points."speculators.commands"]``.
    """
    commands: dict[str, str] = {}
    for pyproject in sorted((REPO / "plugins").glob("*/pyproject.toml")):
        table = ""
        distribution = None
        for raw in pyproject.read_text().splitlines():
            line = raw.strip()
            if line.startswith("["):
                table = line
                continue
            key, sep, value = (part.strip() for part in line.partition("="))
            if not sep or line.startswith("#"):
                continue
            if table == "[project]" and key == "name":
                distribution = value.strip("\"'")
            elif table == '[project.entry-points."speculators.commands"]':
                assert distribution is not None, f"{pyproject}: entry points before [project]"
                commands[key.strip("\"'")] = distribution
    return commands


def _long_options(command: click.Command) -> tuple[str, ...]:
    names: list[str] = []
    for param in command.params:
        if isinstance(param, click.Option):
            names += [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
    return tuple(names)


def walk_cli() -> list[CommandInfo]:
    """Every command path of the live ``speculators`` CLI, the root included."""
    root_ctx = click.Context(cli, info_name=ROOT)
    ours = repository_plugin_commands()
    installed = {name: info.distribution for name, info in cli._plugin_infos().items()}
    found: list[CommandInfo] = [CommandInfo(ROOT, _long_options(cli), True, False)]

    def visit(command: click.Command, ctx: click.Context, path: str, required: bool) -> None:
        unavailable = (command.help or "").startswith("[UNAVAILABLE]")
        found.append(CommandInfo(path, _long_options(command), required, unavailable))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, f"'{path}' lists '{name}' but cannot load it"
                visit(
                    sub, click.Context(sub, info_name=name, parent=ctx), f"{path} {name}", required
                )

    for name in cli.list_commands(root_ctx):
        command = cli.get_command(root_ctx, name)
        assert command is not None, f"'speculators' lists '{name}' but cannot load it"
        # A repository plugin's command, when installed from this repository, is documented.
        required = name in BUILTIN_COMMANDS or (name in ours and installed.get(name) == ours[name])
        visit(
            command,
            click.Context(command, info_name=name, parent=root_ctx),
            f"{ROOT} {name}",
            required,
        )
    return found


@pytest.fixture(scope="module")
def commands() -> list[CommandInfo]:
    # Only this repository's commands are checked. A test-only distribution that other tests
    # install (speculators-fixture-good) can stay visible in this process without being
    # loadable; strict plugin loading would turn that into an error unrelated to the guide.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SPECULATORS_STRICT_PLUGINS", raising=False)
        return walk_cli()


@pytest.fixture(scope="module")
def guide() -> str:
    assert GUIDE.is_file(), f"{GUIDE} is missing"
    return GUIDE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sections(guide: str) -> dict[str, Section]:
    return parse_sections(guide)


def test_the_walk_reaches_every_builtin_and_nested_command(commands: list[CommandInfo]) -> None:
    paths = {c.path for c in commands}
    for name in BUILTIN_COMMANDS:
        assert f"{ROOT} {name}" in paths
    for sub in ("prepare", "regenerate", "hidden-states", "vocab"):
        assert f"{ROOT} data {sub}" in paths
    # The repository's plugin commands are read from plugins/*/pyproject.toml.
    assert repository_plugin_commands().get("hass") == "speculators-hass"
    by_path = {c.path: c for c in commands}
    assert "--budget-minutes" in by_path[f"{ROOT} quickstart"].long_options
    # Options generated from TrainingArguments, flag pairs included, are seen.
    train = set(by_path[f"{ROOT} train"].long_options)
    assert {"--seq-len", "--shuffle", "--no-shuffle", "--dry-run"} <= train


def test_every_command_has_a_section(
    commands: list[CommandInfo], sections: dict[str, Section]
) -> None:
    missing = [c.path for c in commands if c.required and c.path not in sections]
    assert not missing, f"docs/user-guide.md has no '## `<command>`' section for: {missing}"


def test_every_long_option_is_named_in_its_section(
    commands: list[CommandInfo], sections: dict[str, Section]
) -> None:
    undocumented = [
        f"{c.path} {option}"
        for c in commands
        if c.required and not c.unavailable and c.path in sections
        for option in c.long_options
        if not mentions_option(sections[c.path].text, option)
    ]
    assert not undocumented, (
        f"options missing from their docs/user-guide.md section: {undocumented}"
    )


def test_every_section_names_a_real_command(
    commands: list[CommandInfo], sections: dict[str, Section]
) -> None:
    live = {c.path for c in commands}
    # A section of a repository plugin that is not installed here may stay.
    optional = set(repository_plugin_commands())
    stale = [path for path in sections if path not in live and path.split(" ")[1] not in optional]
    assert not stale, f"docs/user-guide.md documents commands the CLI does not have: {stale}"


def test_every_section_is_in_the_table_of_contents(
    guide: str, sections: dict[str, Section]
) -> None:
    missing = [s.path for s in sections.values() if f"(#{s.anchor})" not in guide]
    assert not missing, f"the table of contents of docs/user-guide.md lacks: {missing}"


def test_option_mentions_are_whole_words() -> None:
    text = "Use --eval-max-new-tokens and --seed-like, or `--overwrite`."
    assert not mentions_option(text, "--max-new-tokens")
    assert not mentions_option(text, "--seed")
    assert mentions_option(text, "--overwrite")
    assert mentions_option(text, "--eval-max-new-tokens")


def test_sections_end_at_the_next_heading_of_their_level() -> None:
    markdown = "\n".join(
        [
            "## `speculators data`",
            "group text",
            "### `speculators data prepare`",
            "prepare text --seed",
            "#### Resuming",
            "still prepare --overwrite",
            "### `speculators data vocab`",
            "```bash",
            "# a comment, not a heading",
            "```",
            "vocab text",
            "## Other",
            "not vocab",
        ]
    )
    found = parse_sections(markdown)
    assert set(found) == {"speculators data", "speculators data prepare", "speculators data vocab"}
    assert "--overwrite" in found["speculators data prepare"].text
    assert "vocab text" not in found["speculators data prepare"].text
    assert "not vocab" not in found["speculators data vocab"].text
    assert "prepare text" in found["speculators data"].text
    assert found["speculators data vocab"].anchor == "speculators-data-vocab"
