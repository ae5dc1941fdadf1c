"""The plugin host a CLI command uses: the one its caller passed, else the process default.

Commands hand this host to the library functions they call, so everything one invocation
loads, trains, converts or checks is decided by one host. A program embedding the CLI (and the
tests) passes its own host as click's context object:
``CliRunner().invoke(command, args, obj=host)``.
"""

from __future__ import annotations

import click

from speculators_core.plugins.host import PluginHost, get_host

__all__ = ["command_host"]


def command_host() -> PluginHost:
    """The host passed as the click context object, or the default one (built from the env)."""
    ctx = click.get_current_context(silent=True)
    host = ctx.find_object(PluginHost) if ctx is not None else None
    return host if host is not None else get_host()
