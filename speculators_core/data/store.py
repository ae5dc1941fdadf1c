"""The hidden-state shard store: safetensors shards + a manifest, written resumably.

Layout of a finished store ``STORE/``::

    manifest.json              verifier (path, fingerprint, layers, hidden size), hidden-state
                               spec with the meaning of each id, dtype, backend, the prepared
                               data it came from (source, split, seed, seq_length), counts,
                               per-sample token counts, and one entry per shard
    shard-00000.safetensors    samples [0, S): input_ids int32 [T], loss_mask uint8 [T],
    shard-00001.safetensors    offsets int64 [k+1], hidden_states [T, n, Ht] in the store dtype
    ...

Sample ``i`` lives in shard ``i // S`` (``S`` = ``shard_size``), so which samples a shard holds
never depends on when the run was interrupted.

**Writing and resuming.** A run works in the hidden sibling folder ``.STORE.partial/`` (with a
``run.json`` recording its settings and a lock file against a second concurrent writer). Each
shard is written to a temporary name and renamed into place, so a shard file either is complete
or does not exist. A run killed at any point (SIGKILL included) is resumed by running the same
command again: finished shards are kept, temporary leftovers are deleted, the missing shards are
computed (batches are formed inside a shard, so they are the same as in an uninterrupted run),
and the manifest is written last; then the folder is renamed to ``STORE``. A store therefore
appears under its name only when complete, and :meth:`ShardStore.open` refuses anything else
with a one-line error.

**Reading.** :class:`ShardStore` is a map-style dataset: ``store[i]`` reads just that sample's
rows from the memory-mapped shard (safetensors slices), ``store.num_tokens(i)`` reads nothing.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from speculators_core.data.errors import StoreError, VerifierMismatchError
from speculators_core.data.fingerprint import (
    check_verifier_matches,
    file_digest,
    short_fingerprint,
)
from speculators_core.data.locking import exclusive_lock
from speculators_core.data.prepared import PreparedDataset
from speculators_core.data.summary import DataSummary
from speculators_core.features import HiddenStateSpec
from speculators_core.fsutil import atomic_file

__all__ = [
    "DTYPES",
    "STORE_FORMAT",
    "CaptureBackend",
    "ShardStore",
    "ShardStoreWriter",
    "StoreManifest",
    "capture_to_store",
    "layer_semantics",
    "partial_path",
]

logger = logging.getLogger(__name__)

STORE_FORMAT = "speculators-hidden-states"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
LOCK_NAME = ".lock"
_SHARD_RE = re.compile(r"^shard-(\d{5})\.safetensors$")

#: Storage dtypes by name.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.safetensors"


def partial_path(store: str | os.PathLike[str]) -> Path:
    """The working folder of an unfinished run that writes ``store``."""
    path = Path(store)
    return path.parent / f".{path.name}.partial"


def layer_semantics(spec: HiddenStateSpec, num_layers: int) -> list[str]:
    """What each captured id means, in spec order (written to the manifest for humans)."""
    out = []
    last = len(spec.layer_ids) - 1
    for pos, k in enumerate(spec.layer_ids):
        if k == 0:
            out.append("0: token embeddings (input of decoder layer 0)")
        elif k < num_layers:
            out.append(f"{k}: residual stream entering decoder layer {k} (HF hidden_states[{k}])")
        elif spec.post_norm_last and pos == last:
            out.append(f"{k}: final decoder output after the final norm (post-norm)")
        else:
            out.append(f"{k}: final decoder output before the final norm (pre-norm)")
    return out


class CaptureBackend(Protocol):
    """What the writer needs from a hidden-state backend (transformers or vLLM)."""

    spec: HiddenStateSpec
    num_layers: int
    hidden_size: int

    def capture_batch(self, input_ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[L_i, n, H]`` states for each 1-D token tensor."""
        ...


# ------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    """One shard file: which samples it holds, their tokens, its size."""

    file: str
    first_sample: int
    num_samples: int
    num_tokens: int
    num_supervised_tokens: int
    bytes: int


@dataclass
class StoreManifest:
    """The parsed ``manifest.json`` of a store."""

    verifier_path: str
    verifier_fingerprint: str
    verifier_num_layers: int
    hidden_size: int
    vocab_size: int
    layer_ids: list[int]
    post_norm_last: bool
    layer_semantics: list[str]
    dtype_name: str
    compute_dtype: str
    backend: str
    source: dict[str, Any]
    shard_size: int
    num_samples: int
    num_tokens: int
    num_supervised_tokens: int
    sample_num_tokens: list[int]
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = STORE_FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def spec(self) -> HiddenStateSpec:
        """The captured states as a :class:`HiddenStateSpec`."""
        return HiddenStateSpec(layer_ids=tuple(self.layer_ids), post_norm_last=self.post_norm_last)

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of ``hidden_states``."""
        return DTYPES[self.dtype_name]

    @property
    def split(self) -> str:
        """The data split the samples come from (``train`` or ``heldout``)."""
        return str(self.source.get("split", "train"))

    @property
    def seed(self) -> int | None:
        """The shuffle seed of the prepared data."""
        seed = self.source.get("seed")
        return int(seed) if isinstance(seed, int) else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``manifest.json`` holds)."""
        data = asdict(self)
        data["dtype"] = data.pop("dtype_name")
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> StoreManifest:
        """Parse ``manifest.json``; a one-line :class:`StoreError` if it is not a store manifest."""
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            raise StoreError(
                f"'{where}' is not a hidden-state store (manifest format "
                f"{data.get('format') if isinstance(data, dict) else None!r}); make one with "
                "'speculators data hidden-states'"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"store '{where}' has format version {data.get('format_version')!r}; this "
                f"version reads {FORMAT_VERSION}: capture the hidden states again"
            )
        try:
            fields = dict(data)
            fields["dtype_name"] = fields.pop("dtype")
            fields["shards"] = [ShardInfo(**s) for s in fields["shards"]]
            names = set(cls.__dataclass_fields__)
            manifest = cls(**{k: v for k, v in fields.items() if k in names})
        except (KeyError, TypeError) as err:
            raise StoreError(
                f"store '{where}' has a broken manifest ({err!r}); capture again"
            ) from None
        if manifest.dtype_name not in DTYPES:
            raise StoreError(f"store '{where}' has unknown dtype '{manifest.dtype_name}'")
        return manifest


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------


class ShardStore(Dataset[dict[str, torch.Tensor]], Sequence[dict[str, torch.Tensor]]):
    """A finished hidden-state store, read lazily (see the module docs).

    ``store[i]`` is ``{"input_ids": LongTensor[L], "loss_mask": LongTensor[L],
    "hidden_states": Tensor[L, n, Ht]}`` with ``hidden_states`` in the store dtype.
    """

    #: How many shard files stay open (memory-mapped) at once.
    max_open_shards = 4

    def __init__(self, path: Path, manifest: StoreManifest) -> None:
        self.path = path
        self.manifest = manifest
        self._starts = [s.first_sample for s in manifest.shards]
        self._open: OrderedDict[int, tuple[Any, list[int]]] = OrderedDict()
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ShardStore:
        """Open a finished store; a one-line :class:`StoreError` if it is missing or unusable."""
        folder = Path(path)
        if not folder.exists():
            if partial_path(folder).exists():
                raise StoreError(
                    f"store '{folder}' is incomplete: a run was interrupted (its work is in "
                    f"'{partial_path(folder)}'); rerun the same 'speculators data hidden-states' "
                    "command to finish it"
                )
            raise StoreError(
                f"store '{folder}' does not exist; make it with 'speculators data hidden-states'"
            )
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise StoreError(
                f"'{folder}' has no {MANIFEST_NAME}, so it is not a finished hidden-state store; "
                "make it with 'speculators data hidden-states'"
            )
        try:
            data = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(
                f"'{manifest_path}' is not valid JSON ({err.msg}); capture again"
            ) from None
        manifest = StoreManifest.from_json(data, where=str(folder))
        expected_first = 0
        for shard in manifest.shards:
            file = folder / shard.file
            if not file.is_file() or file.stat().st_size != shard.bytes:
                raise StoreError(
                    f"store '{folder}' is corrupt: {shard.file} is missing or has the wrong size; "
                    "capture the hidden states again"
                )
            if shard.first_sample != expected_first:
                raise StoreError(f"store '{folder}' is corrupt: its shards do not tile the samples")
            expected_first += shard.num_samples
        if (
            expected_first != manifest.num_samples
            or len(manifest.sample_num_tokens) != expected_first
        ):
            raise StoreError(
                f"store '{folder}' is corrupt: shard sample counts do not add up to "
                f"{manifest.num_samples}; capture again"
            )
        return cls(folder, manifest)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def num_tokens(self, index: int) -> int:
        """Length of sample ``index`` (from the manifest; reads no tensor)."""
        return self.manifest.sample_num_tokens[index]

    def _shard(self, shard_index: int) -> tuple[Any, list[int]]:
        if self._pid != os.getpid():  # a forked DataLoader worker: reopen its own handles
            self._open.clear()
            self._pid = os.getpid()
        if shard_index in self._open:
            self._open.move_to_end(shard_index)
            return self._open[shard_index]
        file = self.path / self.manifest.shards[shard_index].file
        try:
            handle = safe_open(str(file), framework="pt")
            offsets = handle.get_tensor("offsets").tolist()
        except (OSError, SafetensorError) as err:
            raise StoreError(
                f"store '{self.path}': cannot read {file.name} ({err}); capture again"
            ) from None
        self._open[shard_index] = (handle, offsets)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return handle, offsets

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a store of {len(self)} samples")
        index %= len(self)
        shard_index = bisect.bisect_right(self._starts, index) - 1
        handle, offsets = self._shard(shard_index)
        local = index - self._starts[shard_index]
        lo, hi = offsets[local], offsets[local + 1]
        return {
            "input_ids": handle.get_slice("input_ids")[lo:hi].long(),
            "loss_mask": handle.get_slice("loss_mask")[lo:hi].long(),
            "hidden_states": handle.get_slice("hidden_states")[lo:hi],
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """All samples in order, shard by shard."""
        for i in range(len(self)):
            yield self[i]

    def check_verifier(self, verifier: str | os.PathLike[str]) -> None:
        """Raise :class:`VerifierMismatchError` unless ``verifier`` is the one this store was made from."""
        check_verifier_matches(
            what=f"store '{self.path}'",
            recorded_fingerprint=self.manifest.verifier_fingerprint,
            recorded_path=self.manifest.verifier_path,
            verifier=verifier,
        )


# ------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------


class ShardStoreWriter:
    """Writes the shards of one store run into its ``.partial`` folder and finishes the store.

    Used by :func:`capture_to_store`; usable directly for other producers of hidden states.
    ``run_settings`` identify the run: resuming with different settings is refused.
    """

    def __init__(
        self,
        output: str | os.PathLike[str],
        *,
        run_settings: dict[str, Any],
        shard_size: int,
        num_samples: int,
        overwrite: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard size must be at least 1 sample, got {shard_size}")
        self.output = Path(output)
        self.work = partial_path(self.output)
        self.run_settings = {**run_settings, "shard_size": shard_size, "num_samples": num_samples}
        self.shard_size = shard_size
        self.num_samples = num_samples
        self.overwrite = overwrite
        self.num_shards = (num_samples + shard_size - 1) // shard_size

    def shard_range(self, index: int) -> range:
        """The sample indices of shard ``index``."""
        lo = index * self.shard_size
        return range(lo, min(lo + self.shard_size, self.num_samples))

    def start(self) -> None:
        """Create or adopt the working folder; refuse a finished output or a different run."""
        if self.output.exists() and not self.overwrite:
            raise StoreError(
                f"store '{self.output}' already exists; choose another --output or pass --overwrite"
            )
        self.work.mkdir(parents=True, exist_ok=True)
        run_file = self.work / RUN_NAME
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
            except json.JSONDecodeError:
                previous = None
            if previous != self.run_settings:
                self._refuse_resume(previous)
        else:
            with atomic_file(run_file) as tmp:
                tmp.write_text(json.dumps(self.run_settings, indent=2, sort_keys=True) + "\n")
        for leftover in self.work.iterdir():
            # Temporary files of shards being written when a previous run was killed.
            if leftover.name.startswith(".shard-") and ".tmp-" in leftover.name:
                leftover.unlink(missing_ok=True)

    def _refuse_resume(self, previous: Any) -> None:
        if not isinstance(previous, dict):
            raise StoreError(
                f"'{self.work}' holds an interrupted run with an unreadable {RUN_NAME}; delete "
                "that folder to start again"
            )
        if previous.get("verifier_fingerprint") != self.run_settings.get("verifier_fingerprint"):
            raise VerifierMismatchError(
                f"interrupted run '{self.work}' was made from verifier "
                f"'{previous.get('verifier_path')}' (fingerprint "
                f"{short_fingerprint(str(previous.get('verifier_fingerprint')))}), not "
                f"'{self.run_settings.get('verifier_path')}'; resume with that verifier or "
                "delete the folder"
            )
        diffs = sorted(
            k
            for k in set(previous) | set(self.run_settings)
            if previous.get(k) != self.run_settings.get(k)
        )
        shown = ", ".join(
            f"{k}: {previous.get(k)!r} then, {self.run_settings.get(k)!r} now" for k in diffs[:3]
        )
        raise StoreError(
            f"interrupted run '{self.work}' used other settings ({shown}); rerun with the same "
            "arguments to resume it, or delete that folder to start again"
        )

    def done_shards(self) -> dict[int, dict[str, str]]:
        """Finished shards in the working folder and their metadata (unreadable ones are deleted)."""
        done: dict[int, dict[str, str]] = {}
        for file in sorted(self.work.iterdir()):
            match = _SHARD_RE.match(file.name)
            if not match:
                continue
            index = int(match.group(1))
            meta = _shard_metadata(file)
            expected = self.shard_range(index) if index < self.num_shards else range(0)
            if (
                meta is None
                or int(meta.get("first_sample", -1)) != expected.start
                or int(meta.get("num_samples", -1)) != len(expected)
            ):
                logger.warning("discarding unusable shard %s", file)
                file.unlink(missing_ok=True)
                continue
            done[index] = meta
        return done

    def write_shard(
        self,
        index: int,
        samples: Sequence[dict[str, torch.Tensor]],
        *,
        dtype: torch.dtype,
    ) -> int:
        """Write shard ``index`` from its samples (``input_ids``, ``loss_mask``, ``hidden_states``).

        Returns the file size. The file appears under its final name only when complete.
        """
        expected = self.shard_range(index)
        if len(samples) != len(expected):
            raise ValueError(f"shard {index} needs {len(expected)} samples, got {len(samples)}")
        lengths = [int(s["input_ids"].numel()) for s in samples]
        offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        ids = torch.cat([s["input_ids"].reshape(-1) for s in samples]).to(torch.int32)
        mask = torch.cat([s["loss_mask"].reshape(-1) for s in samples]).to(torch.uint8)
        states = torch.cat([s["hidden_states"].to(dtype) for s in samples]).contiguous()
        metadata = {
            "first_sample": str(expected.start),
            "num_samples": str(len(expected)),
            "num_tokens": str(int(offsets[-1])),
            "num_supervised_tokens": str(int(mask.sum())),
            "sample_num_tokens": json.dumps(lengths),
        }
        target = self.work / shard_name(index)
        with atomic_file(target) as tmp:
            save_file(
                {"input_ids": ids, "loss_mask": mask, "offsets": offsets, "hidden_states": states},
                str(tmp),
                metadata=metadata,
            )
        return target.stat().st_size

    def finish(self, manifest_fields: dict[str, Any]) -> StoreManifest:
        """Write the manifest from the finished shards and rename the folder to the store's name."""
        done = self.done_shards()
        missing = [i for i in range(self.num_shards) if i not in done]
        if missing:
            raise StoreError(f"cannot finish '{self.output}': shards {missing[:5]} are missing")
        shards: list[ShardInfo] = []
        sample_tokens: list[int] = []
        for index in range(self.num_shards):
            meta = done[index]
            file = self.work / shard_name(index)
            shards.append(
                ShardInfo(
                    file=file.name,
                    first_sample=int(meta["first_sample"]),
                    num_samples=int(meta["num_samples"]),
                    num_tokens=int(meta["num_tokens"]),
                    num_supervised_tokens=int(meta["num_supervised_tokens"]),
                    bytes=file.stat().st_size,
                )
            )
            sample_tokens.extend(json.loads(meta["sample_num_tokens"]))
        manifest = StoreManifest(
            **manifest_fields,
            shard_size=self.shard_size,
            num_samples=self.num_samples,
            num_tokens=sum(s.num_tokens for s in shards),
            num_supervised_tokens=sum(s.num_supervised_tokens for s in shards),
            sample_num_tokens=sample_tokens,
            shards=shards,
        )
        with atomic_file(self.work / MANIFEST_NAME) as tmp:
            tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        (self.work / RUN_NAME).unlink(missing_ok=True)
        (self.work / LOCK_NAME).unlink(missing_ok=True)
        old: Path | None = None
        if self.output.exists():  # only reachable with overwrite (checked in start)
            old = self.output.parent / f".{self.output.name}.old-{os.getpid()}"
            os.replace(self.output, old)
        os.replace(self.work, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def _shard_metadata(file: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata()
            keys = set(handle.keys())
    except (OSError, SafetensorError):
        return None
    if not meta or not {"input_ids", "loss_mask", "offsets", "hidden_states"} <= keys:
        return None
    return dict(meta)


# ------------------------------------------------------------------------------------------------
# the capture run
# ------------------------------------------------------------------------------------------------


def _prepared_identity(prepared: PreparedDataset) -> dict[str, Any]:
    return {
        "path": str(prepared.path.resolve()),
        "tokens_digest": file_digest(prepared.path / "tokens.safetensors"),
    }


def capture_to_store(
    *,
    verifier: str | os.PathLike[str],
    prepared: str | os.PathLike[str] | PreparedDataset,
    output: str | os.PathLike[str],
    spec: HiddenStateSpec,
    dtype: torch.dtype | str = torch.bfloat16,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    shard_size: int = 256,
    max_samples: int | None = None,
    backend: str = "transformers",
    device: str | None = None,
    compute_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    backend_factory: Callable[[], CaptureBackend] | None = None,
) -> DataSummary:
    """Capture the hidden states of prepared samples into a store at ``output`` (resumable).

    ``backend`` is ``transformers`` (default) or ``vllm``; ``backend_factory`` overrides how the
    backend is built (tests use it to wrap one). Rerunning after an interruption resumes; see
    the module docs.
    """
    from tqdm.auto import tqdm

    from speculators_core.data.fingerprint import tokenizer_fingerprint, verifier_fingerprint
    from speculators_core.data.verifier import read_verifier_config, verifier_folder

    start_time = time.perf_counter()
    store_dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if store_dtype is None or store_dtype not in _DTYPE_NAMES:
        raise StoreError(f"unsupported store dtype {dtype}; use one of {', '.join(DTYPES)}")
    data = prepared if isinstance(prepared, PreparedDataset) else PreparedDataset.open(prepared)
    folder = verifier_folder(verifier)
    config = read_verifier_config(folder)
    num_layers = int(config.get("num_hidden_layers", 0))
    hidden_size = int(config.get("hidden_size", 0))
    try:
        spec.validate(num_layers)
    except ValueError as err:
        raise StoreError(f"{err}; pick layer ids for verifier '{folder}'") from None
    if data.manifest.tokenizer_fingerprint != tokenizer_fingerprint(folder):
        raise VerifierMismatchError(
            f"prepared data '{data.path}' was tokenized with the tokenizer of verifier "
            f"'{data.manifest.verifier_path}', not '{folder}' (different tokenizer files); "
            "prepare the data again with this verifier"
        )
    num_samples = len(data) if max_samples is None else min(max_samples, len(data))
    if num_samples == 0:
        raise StoreError(f"prepared data '{data.path}' has no samples")
    fingerprint = verifier_fingerprint(folder)
    if compute_dtype is None and backend == "transformers":
        from speculators_core.data.verifier import resolve_device

        compute_dtype = torch.float32 if resolve_device(device).type == "cpu" else torch.bfloat16
    if compute_dtype is not None:
        compute_name = _DTYPE_NAMES.get(compute_dtype, str(compute_dtype))
    else:  # vLLM picks: float32 on CPU (see vllm_backend), the model's dtype on GPUs
        compute_name = "float32" if not torch.cuda.is_available() else "auto"
    writer = ShardStoreWriter(
        output,
        run_settings={
            "verifier_path": str(folder.resolve()),
            "verifier_fingerprint": fingerprint,
            "spec": spec.to_json(),
            "dtype": _DTYPE_NAMES[store_dtype],
            "compute_dtype": compute_name,
            "backend": backend,
            "batch_size": batch_size,
            "max_batch_tokens": max_batch_tokens,
            "prepared": _prepared_identity(data),
        },
        shard_size=shard_size,
        num_samples=num_samples,
        overwrite=overwrite,
    )
    if writer.output.exists() and not overwrite:
        raise StoreError(
            f"store '{output}' already exists; choose another --output or pass --overwrite"
        )
    writer.work.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(writer.work / LOCK_NAME, f"'{output}'"):
        writer.start()
        done = writer.done_shards()
        todo = [i for i in range(writer.num_shards) if i not in done]
        total_tokens = sum(data.num_tokens(i) for i in range(num_samples))
        done_tokens = sum(int(m["num_tokens"]) for m in done.values())
        processed = 0
        if todo:
            if backend_factory is not None:
                capture = backend_factory()
            else:
                longest = max(data.num_tokens(i) for i in range(num_samples))
                capture = _make_backend(backend, folder, spec, compute_dtype, device, longest + 1)
            bar = tqdm(
                total=total_tokens,
                initial=done_tokens,
                desc="hidden states",
                unit="tok",
                unit_scale=True,
                disable=not progress,
            )
            try:
                for index in todo:
                    samples = [data[i] for i in writer.shard_range(index)]
                    lengths = [int(s["input_ids"].numel()) for s in samples]
                    for batch in plan_batches_for(lengths, batch_size, max_batch_tokens):
                        states = capture.capture_batch([samples[i]["input_ids"] for i in batch])
                        for i, st in zip(batch, states, strict=True):
                            samples[i]["hidden_states"] = st.to(store_dtype)
                        bar.update(sum(lengths[i] for i in batch))
                        processed += sum(lengths[i] for i in batch)
                    writer.write_shard(index, samples, dtype=store_dtype)
            finally:
                if backend_factory is None and hasattr(capture, "close"):
                    capture.close()  # stop a vLLM engine now, not when it is collected
            bar.close()
        manifest = writer.finish(
            {
                "verifier_path": str(folder.resolve()),
                "verifier_fingerprint": fingerprint,
                "verifier_num_layers": num_layers,
                "hidden_size": hidden_size,
                "vocab_size": int(data.manifest.vocab_size),
                "layer_ids": list(spec.layer_ids),
                "post_norm_last": spec.post_norm_last,
                "layer_semantics": layer_semantics(spec, num_layers),
                "dtype_name": _DTYPE_NAMES[store_dtype],
                "compute_dtype": compute_name,
                "backend": backend,
                "source": {
                    "prepared_path": str(data.path.resolve()),
                    "sources": list(data.manifest.sources),
                    "split": data.manifest.split,
                    "seed": data.manifest.seed,
                    "seq_length": data.manifest.seq_length,
                    "tokenizer_fingerprint": data.manifest.tokenizer_fingerprint,
                    "regenerated": data.manifest.regenerated,
                },
            }
        )
    notes = [f"resumed with {len(done)} of {writer.num_shards} shards done"] if done else []
    return DataSummary.of_folder(
        "captured",
        output,
        manifest,
        seconds=time.perf_counter() - start_time,
        tokens_processed=processed,
        notes=notes,
    )


def plan_batches_for(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None
) -> list[list[int]]:
    """Batches of one shard (see :func:`speculators_core.data.capture.plan_batches`)."""
    from speculators_core.data.capture import plan_batches

    return plan_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens)


def _make_backend(
    backend: str,
    verifier: Path,
    spec: HiddenStateSpec,
    compute_dtype: torch.dtype | None,
    device: str | None,
    max_model_len: int,
) -> CaptureBackend:
    if backend == "transformers":
        from speculators_core.data.capture import HiddenStateCapture

        return HiddenStateCapture.from_verifier(verifier, spec, dtype=compute_dtype, device=device)
    if backend == "vllm":
        from speculators_core.data.vllm_backend import VllmHiddenStates

        return VllmHiddenStates(verifier, spec, max_model_len=max_model_len)
    raise StoreError(f"unknown hidden-state backend '{backend}'; use 'transformers' or 'vllm'")
