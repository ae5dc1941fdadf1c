"""``speculators hass ...``: the HASS plugin's commands (entry point ``speculators.commands:hass``)."""

from __future__ import annotations

from pathlib import Path

import click

from speculators_core import SpeculatorsError

__all__ = ["hass_group"]


@click.group("hass")
def hass_group() -> None:
    """EAGLE-1/2 drafts trained the HASS way (speculators_model_type 'eagle')."""


@hass_group.command("export-vllm")
@click.argument("speculator", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def export_vllm(speculator: Path, output: Path, overwrite: bool) -> None:
    """Export the eagle draft SPECULATOR to OUTPUT in the layout vLLM's method 'eagle' serves.

    vLLM does not read speculators 'eagle' folders; it serves the export with
    --speculative-config '{"method": "eagle", "model": "OUTPUT", "num_speculative_tokens": 3}'
    next to the verifier. Drafts with fusion_bias or layernorms cannot be exported.
    """
    from speculators_hass.export import export_vllm_eagle

    if output.exists() and not overwrite:
        raise SpeculatorsError(
            f"output folder '{output}' already exists; pass --overwrite or choose another path"
        )
    if not speculator.is_dir():
        raise SpeculatorsError(f"speculator folder '{speculator}' does not exist")
    export_vllm_eagle(speculator, output, overwrite=overwrite)
    click.echo(f"exported {speculator} -> {output} (serve with method 'eagle')")
