"""The ``speculators`` root command: built-in commands, lazily loaded plugin commands, error policy.

Errors are one line on stderr and exit code 1 (2 for usage errors, from click); ``--debug``
shows the traceback and debug logging. Plugin commands come from the ``speculators.commands``
entry-point group and are imported only when run or listed by ``--help``; one that fails to load
becomes a placeholder that explains the failure.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from typing import Any

import click

from speculators_core.errors import SpeculatorsError
from speculators_core.plugins.host import (
    COMMAND_GROUP,
    EntryPointInfo,
    PluginHost,
    PluginSettings,
    list_entry_points,
)

__all__ = ["BUILTIN_COMMANDS", "cli", "main"]

#: Built-in commands: name -> "module:attribute", imported on use so ``--help`` stays fast.
BUILTIN_COMMANDS: dict[str, str] = {
    "plugins": "speculators_core.cli.plugins_cmd:plugins_command",
    "data": "speculators_core.cli.data:data_group",
    "train": "speculators_core.cli.train:train_command",
    "objectives": "speculators_core.cli.objectives_cmd:objectives_command",
    "eval": "speculators_core.cli.eval_cmd:eval_command",
    "check": "speculators_core.cli.check:check_command",
    "convert": "speculators_core.cli.convert:convert_command",
    "serve": "speculators_core.cli.serve:serve_command",
    "quickstart": "speculators_core.cli.quickstart:quickstart_command",
}


def _load_object(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _placeholder(info: EntryPointInfo, error: BaseException | str) -> click.Command:
    """A command standing in for a plugin command that failed to load or is disabled."""
    reason = error if isinstance(error, str) else f"failed to load: {error!r}"
    message = f"command '{info.name}' from {info.provided_by} is unavailable: {reason}"

    def run(**_: Any) -> None:
        raise SpeculatorsError(message + "; run 'speculators plugins' for details")

    return click.Command(
        info.name,
        callback=run,
        help=f"[UNAVAILABLE] {message}",
        short_help=f"[UNAVAILABLE] {reason}"[:80],
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def load_plugin_command(info: EntryPointInfo, settings: PluginSettings) -> click.Command:
    """Import one plugin command through stevedore, or return a placeholder explaining why not."""
    blocked = settings.blocked_reason(info)
    if blocked is not None:
        return _placeholder(info, blocked)
    from stevedore import DriverManager

    failures: list[BaseException] = []
    try:
        manager: DriverManager[Any] = DriverManager(
            namespace=COMMAND_GROUP,
            name=info.name,
            invoke_on_load=False,
            on_load_failure_callback=lambda _m, _ep, err: failures.append(err),
        )
        command = manager.driver
    except Exception as err:  # stevedore raises NoMatches after the callback saw the cause
        cause = failures[0] if failures else err
        if settings.strict:
            raise SpeculatorsError(
                f"could not load plugin {info.key} ({info.provided_by}): {cause!r} "
                "(SPECULATORS_STRICT_PLUGINS is set)"
            ) from cause
        logging.getLogger("speculators_core.plugins.host").warning(
            "could not load plugin %s (%s): %r", info.key, info.provided_by, cause
        )
        return _placeholder(info, cause)
    if not isinstance(command, click.Command):
        return _placeholder(info, f"entry point is a {type(command).__name__}, not a click command")
    if command.help and "Provided by" not in command.help:
        command.help = f"{command.help}\n\nProvided by {info.provided_by}."
    return command


class SpeculatorsGroup(click.Group):
    """Root group that lists built-in and plugin commands without importing them."""

    def _plugin_infos(self) -> dict[str, EntryPointInfo]:
        infos: dict[str, EntryPointInfo] = {}
        for info in list_entry_points([COMMAND_GROUP]):
            if info.name not in BUILTIN_COMMANDS and info.name not in self.commands:
                infos.setdefault(info.name, info)
        return infos

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx)) | set(BUILTIN_COMMANDS) | set(self._plugin_infos())
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        if cmd_name in BUILTIN_COMMANDS:
            try:
                loaded = _load_object(BUILTIN_COMMANDS[cmd_name])
            except ImportError as err:
                # A built-in whose optional dependencies are missing still shows in --help.
                core = EntryPointInfo(
                    "speculators.core",
                    cmd_name,
                    BUILTIN_COMMANDS[cmd_name],
                    "speculators-core",
                    None,
                )
                return _placeholder(core, err)
            return loaded if isinstance(loaded, click.Command) else None
        info = self._plugin_infos().get(cmd_name)
        if info is None:
            return None
        return load_plugin_command(info, PluginSettings.from_env())


def _version() -> str:
    from speculators_core.config import core_version

    return core_version()


@click.group(cls=SpeculatorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="speculators", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build, train, convert, evaluate and serve speculative-decoding draft models for vLLM."""
    # ctx.obj is left alone: it is the plugin host a caller may pass (see main(host=...)).
    ctx.meta["speculators.debug"] = debug
    _configure_logging(debug)


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _configure_logging(debug: bool) -> None:
    root = logging.getLogger("speculators_core")
    if not any(getattr(h, "_speculators", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLineFormatter())
        handler._speculators = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def main(argv: list[str] | None = None, *, host: PluginHost | None = None) -> None:
    """Console entry point: run the CLI with the one-line error policy.

    ``host`` is the plugin host the commands use (see
    :func:`speculators_core.cli.plugin_host.command_host`); None: the default host.
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    _configure_logging(debug)
    try:
        cli.main(args=args, prog_name="speculators", standalone_mode=False, obj=host)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except SpeculatorsError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # an unexpected failure: still one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(
            f"error: {type(err).__name__}: {err} (run with --debug for the traceback)", err=True
        )
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
