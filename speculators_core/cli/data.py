"""``speculators data ...``: prepare chat data, regenerate responses, capture hidden states, count tokens.

Each command shows progress bars on stderr and ends with one summary line (samples, tokens,
supervised tokens, bytes written, tokens/s). Bad input raises a
:class:`~speculators_core.errors.SpeculatorsError`, which the root command prints as one line.
Heavy modules are imported inside the commands so ``speculators --help`` stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
from click.core import ParameterSource

from speculators_core.errors import SpeculatorsError

if TYPE_CHECKING:
    from speculators_core.features import HiddenStateSpec

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


#: ``--data-split``/``--data-config``: which split and configuration of a ``datasets`` source.
_HUB_HELP = (
    "of each datasets source among --data (hf:NAME, or owner/name that is no local path), as "
    "datasets.load_dataset takes it"
)


def _data_options(func: click.decorators.FC) -> click.decorators.FC:
    @functools.wraps(func)
    def with_resolved_sources(
        *args: Any, data_split: str | None, data_config: str | None, **kwargs: Any
    ) -> Any:
        from speculators_core.data.conversations import resolve_sources

        kwargs["sources"] = tuple(
            resolve_sources(kwargs["sources"], data_split=data_split, data_config=data_config)
        )
        return func(*args, **kwargs)

    options = [
        click.option(
            "--data",
            "sources",
            required=True,
            multiple=True,
            help="Chat data: a .json/.jsonl/.parquet/.arrow/.csv file, a folder of them, a saved datasets folder, "
            "a datasets name (hf:NAME, or owner/name; streamed), or 'sharegpt' (built in). "
            "Repeatable.",
        ),
        click.option("--data-split", default=None, help=f"Split (default: train) {_HUB_HELP}."),
        click.option("--data-config", default=None, help=f"Configuration {_HUB_HELP}."),
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
    decorated: Any = with_resolved_sources
    for option in reversed(options):
        decorated = option(decorated)
    return cast("click.decorators.FC", decorated)


def _spec_options(note: str = "") -> Callable[[click.decorators.FC], click.decorators.FC]:
    """``--layer-ids``, ``--algorithm``, ``--post-norm-last``, ``--dtype``: which states, stored how.

    ``note`` is appended to each help text (``data regenerate`` takes them only with ``--store``).
    """

    def decorate(func: click.decorators.FC) -> click.decorators.FC:
        options = [
            click.option(
                "--layer-ids",
                default=None,
                help="Hidden-state ids, vLLM semantics: k = input of decoder layer k, N = final "
                "pre-norm output (example for a 30-layer verifier: 2,15,27,30)." + note,
            ),
            click.option(
                "--algorithm",
                default=None,
                help="Ask the installed algorithm plugin which states it needs (instead of "
                "--layer-ids)." + note,
            ),
            click.option(
                "--post-norm-last",
                is_flag=True,
                help="Take the last id (must be N) after the final norm (EAGLE-1/HASS)." + note,
            ),
            click.option(
                "--dtype",
                type=_DTYPE_CHOICES,
                default="bfloat16",
                show_default=True,
                help="Storage dtype." + note,
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _hidden_state_spec(
    verifier: Path, layer_ids: str | None, algorithm: str | None, post_norm_last: bool
) -> HiddenStateSpec:
    """The spec of ``--layer-ids``/``--algorithm``/``--post-norm-last`` (one-line errors)."""
    from speculators_core.cli.plugin_host import command_host
    from speculators_core.data.specs import parse_layer_ids, spec_for_algorithm
    from speculators_core.data.verifier import verifier_folder
    from speculators_core.features import HiddenStateSpec

    if (layer_ids is None) == (algorithm is None):
        raise SpeculatorsError(
            "give exactly one of --layer-ids (e.g. 2,15,27,30) or --algorithm (e.g. eagle3)"
        )
    if algorithm is not None:
        if post_norm_last:
            raise SpeculatorsError("--post-norm-last goes with --layer-ids; --algorithm decides it")
        return spec_for_algorithm(algorithm, verifier_folder(verifier), host=command_host())
    assert layer_ids is not None
    return HiddenStateSpec(layer_ids=parse_layer_ids(layer_ids), post_norm_last=post_norm_last)


def _given(name: str) -> bool:
    """Whether the option ``name`` (its parameter name) was given, not left at its default."""
    source = click.get_current_context().get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


@click.group(name="data")
def data_group() -> None:
    """Make training data from a verifier: prepare, regenerate, hidden-states, vocab."""


@data_group.command("prepare")
@_verifier_option
@_data_options
@click.option(
    "--reasoning-loss/--no-reasoning-loss",
    default=True,
    show_default=True,
    help="Supervise an answer's thinking (reasoning_content, or inline <think>...</think>) "
    "as well as the answer; --no-reasoning-loss keeps it in the context only.",
)
def prepare_command(
    verifier: Path,
    sources: tuple[str, ...],
    output: Path,
    max_samples: int | None,
    seq_length: int,
    split: str,
    seed: int,
    overwrite: bool,
    reasoning_loss: bool,
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
        reasoning_loss=reasoning_loss,
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
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Conversations generated together; with --store also the shard size (the unit of "
    "resuming).",
)
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
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    default=None,
    help="Also record the verifier's hidden states into a store at PATH in the same decoding "
    "pass (one pass: transformers backend, greedy, first user turn only).",
)
@_spec_options(" With --store only.")
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
    store: Path | None,
    layer_ids: str | None,
    algorithm: str | None,
    post_norm_last: bool,
    dtype: str,
) -> None:
    """Replace assistant turns with the verifier's own answers, then prepare them (resumable).

    With --store, the hidden states of every token are recorded while the verifier writes it,
    so the store of 'data hidden-states' comes out of the same pass.
    """
    if store is not None:
        _one_pass_regenerate(
            verifier=verifier,
            sources=sources,
            output=output,
            store=store,
            max_samples=max_samples,
            seq_length=seq_length,
            split=split,
            seed=seed,
            overwrite=overwrite,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            backend=backend,
            device=device,
            max_turns=max_turns,
            layer_ids=layer_ids,
            algorithm=algorithm,
            post_norm_last=post_norm_last,
            dtype=dtype,
        )
        return
    for name, given in (
        ("--layer-ids", layer_ids is not None),
        ("--algorithm", algorithm is not None),
        ("--post-norm-last", post_norm_last),
        ("--dtype", _given("dtype")),
    ):
        if given:
            raise SpeculatorsError(
                f"{name} is about the hidden-state store, which only --store writes; add "
                f"--store PATH, or drop {name} (and run 'data hidden-states' afterwards)"
            )
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


def _one_pass_regenerate(
    *,
    verifier: Path,
    sources: tuple[str, ...],
    output: Path,
    store: Path,
    max_samples: int | None,
    seq_length: int,
    split: str,
    seed: int,
    overwrite: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    backend: str,
    device: str | None,
    max_turns: int | None,
    layer_ids: str | None,
    algorithm: str | None,
    post_norm_last: bool,
    dtype: str,
) -> None:
    """``data regenerate --store``: answers and their hidden states in one decoding pass."""
    one_pass = "--store decodes in one pass (transformers backend, greedy, first user turn only)"
    if backend != "transformers":
        raise SpeculatorsError(
            f"{one_pass}: --backend {backend} does not apply; drop --backend, or drop --store "
            "and run 'data hidden-states' afterwards"
        )
    if temperature > 0:
        raise SpeculatorsError(
            f"{one_pass}: --temperature {temperature:g} would sample; drop --temperature (or "
            "give 0), or drop --store and run 'data hidden-states' afterwards"
        )
    if top_p < 1:
        raise SpeculatorsError(
            f"{one_pass}: --top-p {top_p:g} would sample; drop --top-p (or give 1), or drop "
            "--store and run 'data hidden-states' afterwards"
        )
    if max_turns is not None and max_turns != 1:
        raise SpeculatorsError(
            f"{one_pass}: it answers only the first user turn, not --max-turns {max_turns}; "
            "drop --max-turns (or give 1), or drop --store and run 'data hidden-states' afterwards"
        )
    if _given("chunk_size"):
        raise SpeculatorsError(
            f"{one_pass}: --chunk-size does not apply, it resumes per shard of --batch-size "
            "conversations; drop --chunk-size"
        )
    if seq_length < 2:
        raise SpeculatorsError(f"--store needs --seq-length of at least 2, got {seq_length}")
    if store.resolve() == output.resolve():
        raise SpeculatorsError(
            f"--store and --output are the same folder '{output}'; give the store its own folder"
        )
    spec = _hidden_state_spec(verifier, layer_ids, algorithm, post_norm_last)
    from speculators_core.data.decode_capture import regenerate_to_store
    from speculators_core.data.store import DTYPES

    data_summary, store_summary = regenerate_to_store(
        verifier=verifier,
        sources=list(sources),
        prepared_output=output,
        store_output=store,
        spec=spec,
        max_new_tokens=max_new_tokens,
        seq_length=seq_length,
        max_samples=max_samples,
        split=split,
        seed=seed,
        batch_size=batch_size,
        store_dtype=DTYPES[dtype],
        device=device,
        overwrite=overwrite,
        progress=True,
    )
    click.echo(data_summary.describe())
    click.echo(store_summary.describe())


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
@_spec_options()
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
    from speculators_core.data.store import capture_to_store

    spec = _hidden_state_spec(verifier, layer_ids, algorithm, post_norm_last)
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
