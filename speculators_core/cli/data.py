"""``speculators data ...``: prepare chat data, regenerate responses, capture hidden states, count tokens.

Each command shows progress bars on stderr and ends with one summary line (samples, tokens,
supervised tokens, bytes written, tokens/s). Bad input raises a
:class:`~speculators_core.errors.SpeculatorsError`, which the root command prints as one line.
Heavy modules are imported inside the commands so ``speculators --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from speculators_core.errors import SpeculatorsError

__all__ = ["data_group"]

_DTYPE_CHOICES = click.Choice(["bfloat16", "float16", "float32"])
_BACKENDS = click.Choice(["transformers", "vllm"])


def _verifier_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--verifier",
        required=True,
        type=click.Path(path_type=Path),
        help="Verifier model folder (transformers format, with a chat template).",
    )(func)


def _data_options(func: click.decorators.FC) -> click.decorators.FC:
    options = [
        click.option(
            "--data",
            "sources",
            required=True,
            multiple=True,
            help="Chat data: a .json/.jsonl file, a folder of them, a saved datasets folder, "
            "or 'sharegpt' (built in). Repeatable.",
        ),
        click.option(
            "--output", required=True, type=click.Path(path_type=Path), help="Output folder."
        ),
        click.option(
            "--max-samples",
            type=click.IntRange(min=1),
            default=None,
            help="Keep at most this many samples.",
        ),
        click.option(
            "--seq-length",
            type=click.IntRange(min=1),
            default=2048,
            show_default=True,
            help="Truncate samples to their first N tokens.",
        ),
        click.option(
            "--split",
            type=click.Choice(["train", "heldout"]),
            default="train",
            show_default=True,
            help="Split of a built-in source (ShareGPT: records < 15000 are train, the rest held out).",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Shuffle seed for the conversation order.",
        ),
        click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(name="data")
def data_group() -> None:
    """Make training data from a verifier: prepare, regenerate, hidden-states, vocab."""


@data_group.command("prepare")
@_verifier_option
@_data_options
def prepare_command(
    verifier: Path,
    sources: tuple[str, ...],
    output: Path,
    max_samples: int | None,
    seq_length: int,
    split: str,
    seed: int,
    overwrite: bool,
) -> None:
    """Render chat data with the verifier's template and derive loss masks."""
    from speculators_core.data.prepared import prepare_data

    summary = prepare_data(
        verifier=verifier,
        sources=list(sources),
        output=output,
        seq_length=seq_length,
        max_samples=max_samples,
        split=split,
        seed=seed,
        overwrite=overwrite,
        progress=True,
    )
    click.echo(summary.describe())


@data_group.command("regenerate")
@_verifier_option
@_data_options
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="0 is greedy; above 0 samples.",
)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Conversations per resumable chunk.",
)
@click.option("--backend", type=_BACKENDS, default="transformers", show_default=True)
@click.option(
    "--device", default=None, help="Torch device for the transformers backend (default: auto)."
)
@click.option(
    "--max-turns",
    type=click.IntRange(min=1),
    default=None,
    help="Keep each conversation up to its N-th answer (1: first user turn only).",
)
def regenerate_command(
    verifier: Path,
    sources: tuple[str, ...],
    output: Path,
    max_samples: int | None,
    seq_length: int,
    split: str,
    seed: int,
    overwrite: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    chunk_size: int,
    backend: str,
    device: str | None,
    max_turns: int | None,
) -> None:
    """Replace assistant turns with the verifier's own answers, then prepare them (resumable)."""
    from speculators_core.data.regenerate import GenerationSettings, regenerate_data

    summary = regenerate_data(
        verifier=verifier,
        sources=list(sources),
        output=output,
        settings=GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        ),
        seq_length=seq_length,
        max_samples=max_samples,
        split=split,
        seed=seed,
        batch_size=batch_size,
        chunk_size=chunk_size,
        backend=backend,
        device=device,
        overwrite=overwrite,
        progress=True,
        max_turns=max_turns,
    )
    click.echo(summary.describe())


@data_group.command("hidden-states")
@_verifier_option
@click.option(
    "--prepared",
    required=True,
    type=click.Path(path_type=Path),
    help="Prepared data folder (from 'data prepare' or 'data regenerate').",
)
@click.option(
    "--output", required=True, type=click.Path(path_type=Path), help="Store folder to write."
)
@click.option(
    "--layer-ids",
    default=None,
    help="Hidden-state ids, vLLM semantics: k = input of decoder layer k, N = final pre-norm "
    "output (example for a 30-layer verifier: 2,15,27,30).",
)
@click.option(
    "--algorithm",
    default=None,
    help="Ask the installed algorithm plugin which states it needs (instead of --layer-ids).",
)
@click.option(
    "--post-norm-last",
    is_flag=True,
    help="Take the last id (must be N) after the final norm (EAGLE-1/HASS).",
)
@click.option(
    "--dtype", type=_DTYPE_CHOICES, default="bfloat16", show_default=True, help="Storage dtype."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--max-batch-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Cap on padded tokens per batch.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Samples per shard file (the unit of resuming).",
)
@click.option("--max-samples", type=click.IntRange(min=1), default=None)
@click.option("--backend", type=_BACKENDS, default="transformers", show_default=True)
@click.option(
    "--device", default=None, help="Torch device for the transformers backend (default: auto)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def hidden_states_command(
    verifier: Path,
    prepared: Path,
    output: Path,
    layer_ids: str | None,
    algorithm: str | None,
    post_norm_last: bool,
    dtype: str,
    batch_size: int,
    max_batch_tokens: int | None,
    shard_size: int,
    max_samples: int | None,
    backend: str,
    device: str | None,
    overwrite: bool,
) -> None:
    """Run the verifier over prepared data and store the hidden states (resumable)."""
    from speculators_core.data.specs import parse_layer_ids, spec_for_algorithm
    from speculators_core.data.store import capture_to_store
    from speculators_core.data.verifier import verifier_folder
    from speculators_core.features import HiddenStateSpec

    if (layer_ids is None) == (algorithm is None):
        raise SpeculatorsError(
            "give exactly one of --layer-ids (e.g. 2,15,27,30) or --algorithm (e.g. eagle3)"
        )
    if algorithm is not None:
        if post_norm_last:
            raise SpeculatorsError("--post-norm-last goes with --layer-ids; --algorithm decides it")
        spec = spec_for_algorithm(algorithm, verifier_folder(verifier))
    else:
        assert layer_ids is not None
        spec = HiddenStateSpec(layer_ids=parse_layer_ids(layer_ids), post_norm_last=post_norm_last)
    summary = capture_to_store(
        verifier=verifier,
        prepared=prepared,
        output=output,
        spec=spec,
        dtype=dtype,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        shard_size=shard_size,
        max_samples=max_samples,
        backend=backend,
        device=device,
        overwrite=overwrite,
        progress=True,
    )
    click.echo(summary.describe())


@data_group.command("vocab")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path),
    help="A hidden-state store or a prepared-data folder.",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for token_freq.json (and d2t.npy, t2d.npy).",
)
@click.option(
    "--draft-vocab-size",
    type=click.IntRange(min=1),
    default=None,
    help="Also write d2t/t2d for this many most frequent tokens.",
)
@click.option(
    "--target-vocab-size",
    type=click.IntRange(min=1),
    default=None,
    help="Verifier vocab size (default: recorded in the data).",
)
def vocab_command(
    data: Path, output: Path, draft_vocab_size: int | None, target_vocab_size: int | None
) -> None:
    """Count supervised tokens and build the draft vocabulary mapping (d2t, t2d)."""
    from speculators_core.data.token_freq import build_draft_vocab

    summary = build_draft_vocab(
        data=data,
        output=output,
        draft_vocab_size=draft_vocab_size,
        target_vocab_size=target_vocab_size,
    )
    click.echo(summary.describe())
