"""``speculators objectives``: the training objectives installed, for ``--loss``."""

from __future__ import annotations

import click

from speculators_core.cli.plugin_host import command_host
from speculators_core.evaluate.tables import columns

__all__ = ["objectives_command"]


@click.command("objectives")
def objectives_command() -> None:
    """List the training objectives installed (the core's and the plugins') for --loss.

    Use one by name (--loss lk) or a weighted mix (--loss kl=0.5,lk=0.5); a plugin adds its
    own through the speculators_register_objectives hook.
    """
    objectives = sorted(command_host().objectives().values(), key=lambda o: o.name)
    rows = [[o.name, o.provided_by, o.description] for o in objectives]
    for line in columns(["NAME", "PROVIDED BY", "WHAT IT MINIMISES"], rows):
        click.echo(line.rstrip())
    click.echo("")
    click.echo("use one with --loss NAME, or a weighted mix: --loss kl=0.5,lk=0.5")
