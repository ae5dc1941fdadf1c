"""``speculators check DIR``: lint a speculator folder against what vLLM reads (offline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

__all__ = ["check_command"]


@click.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--verifier",
    type=click.Path(path_type=Path),
    default=None,
    help="Local verifier folder to compare with (default: the folder named in the config, "
    "when it exists here).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as a JSON list.")
def check_command(folder: Path, verifier: Path | None, as_json: bool) -> None:
    """Check a speculator FOLDER against what vLLM reads, without loading it.

    Prints one line per finding, '<file>: <problem>; <fix>', and exits 1 when there are
    findings, 0 when the folder is clean. The core checks what every speculators folder needs
    (config.json fields: top-level model_type, speculators_model_type of an installed plugin,
    speculators_config, speculative_tokens, verifier name_or_path; readable safetensors with
    bare, unfused tensor names); the algorithm's plugin checks the rest (for eagle3: sizes, aux
    layer ids, tensor shapes and dtypes, d2t/t2d and, when the verifier is reachable, the
    vocabulary, hidden size, layer ids and context length against it).
    """
    from speculators_core.check import check_checkpoint
    from speculators_core.cli.plugin_host import command_host

    report = check_checkpoint(folder, host=command_host(), verifier=verifier)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps([f.to_json() for f in report.findings], indent=2))
    else:
        for finding in report.findings:
            click.echo(str(finding))
        if report.ok:
            against = f", compared with verifier '{report.verifier}'" if report.verifier else ""
            click.echo(
                f"{folder}: OK ({report.algorithm}, {report.num_tensors} tensors checked{against})"
            )
        elif report.verifier is None and report.algorithm:
            click.echo(
                "note: the verifier is not reachable here, so the vocabulary and size checks "
                "against it were skipped (pass --verifier DIR)",
                err=True,
            )
    sys.exit(0 if report.ok else 1)
