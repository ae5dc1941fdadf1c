"""``speculators plugins``: every installed plugin entry point, its distribution and status."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from speculators_core.plugins.host import (
    ALL_GROUPS,
    COMMAND_GROUP,
    PluginHost,
    PluginSettings,
    list_entry_points,
)

__all__ = ["collect_plugin_rows", "plugins_command"]


def collect_plugin_rows(settings: PluginSettings | None = None) -> list[dict[str, Any]]:
    """One row per entry point across all groups, with its load status.

    Rows come from installed metadata, so broken plugins are listed too; each hook plugin is
    loaded through a plugin host and each command through stevedore to learn its status
    (``ok``, ``FAILED`` with the error, or ``disabled`` with the reason). In strict mode a
    failure raises instead.
    """
    from speculators_core.cli.main import load_plugin_command

    settings = settings or PluginSettings.from_env()
    host = PluginHost(settings)
    # Loading may log a warning per failure; the listing reports them itself.
    host_logger = logging.getLogger("speculators_core.plugins.host")
    previous = host_logger.level
    host_logger.setLevel(logging.ERROR)
    try:
        registered = set(host.plugin_names())
        rows: list[dict[str, Any]] = []
        for info in list_entry_points(ALL_GROUPS):
            row: dict[str, Any] = {
                "name": info.name,
                "group": info.group,
                "value": info.value,
                "distribution": info.distribution,
                "version": info.version,
                "status": "ok",
                "error": None,
                "hooks": [],
            }
            if info.group == COMMAND_GROUP:
                blocked = settings.blocked_reason(info)
                if blocked:
                    row.update(status="disabled", error=blocked)
                else:
                    command = load_plugin_command(info, settings)
                    help_text = command.help or ""
                    if help_text.startswith("[UNAVAILABLE]"):
                        row.update(status="FAILED", error=help_text.split(": ", 1)[-1])
            elif info.key in host.blocked:
                row.update(status="disabled", error=host.blocked[info.key])
            elif info.key in host.failures:
                row.update(status="FAILED", error=repr(host.failures[info.key].error))
            elif info.key in registered:
                row["hooks"] = host.hooks_of(info.key)
            rows.append(row)
        return rows
    finally:
        host_logger.setLevel(previous)


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list.")
@click.option(
    "--verbose", "-v", is_flag=True, help="Also show entry-point targets and implemented hooks."
)
def plugins_command(as_json: bool, verbose: bool) -> None:
    """List installed speculators plugins (all entry-point groups) and whether they load.

    Works when plugins are broken: a plugin that fails to import shows as FAILED with its
    error. With SPECULATORS_STRICT_PLUGINS=1 a failure is an error (exit 1) instead.
    """
    rows = collect_plugin_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no speculators plugins installed")
        return
    header = ["NAME", "GROUP", "DISTRIBUTION", "VERSION", "STATUS"]
    table = [
        [r["name"], r["group"], r["distribution"] or "?", r["version"] or "?", r["status"]]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row, cells in zip(rows, table):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        if row["error"]:
            click.echo(f"    error: {row['error']}")
        if verbose:
            click.echo(f"    target: {row['value']}")
            if row["hooks"]:
                click.echo(f"    hooks: {', '.join(row['hooks'])}")
