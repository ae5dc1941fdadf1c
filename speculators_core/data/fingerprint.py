"""Fingerprints of a verifier (config + weights) and of its tokenizer, and the mismatch check.

Hidden states are only meaningful for the exact verifier that produced them, so stores record
``verifier_fingerprint(folder)``: a SHA-256 over the model config (minus fields that do not
change the function, such as ``transformers_version``) and the bytes of every weight file.
Hashing SmolLM2's 540 MB of weights takes a couple of seconds, so each file's digest is cached
(in memory and in ``<cache>/fingerprints.json``) under its path, size, inode and modification
time; a file rewritten in place gets a new modification time and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from speculators_core.data.errors import VerifierError, VerifierMismatchError

__all__ = [
    "WEIGHT_SUFFIXES",
    "check_verifier_matches",
    "file_digest",
    "short_fingerprint",
    "tokenizer_fingerprint",
    "verifier_fingerprint",
]

logger = logging.getLogger(__name__)

#: Files whose bytes define a verifier's weights.
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: Config fields that do not change what the model computes.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "name_or_path"})
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_CACHE_FILE = "fingerprints.json"

_memo: dict[str, str] = {}
_lock = threading.Lock()


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _disk_cache_path() -> Path:
    from speculators_core.assets import resolve_cache_dir

    return resolve_cache_dir() / _CACHE_FILE


def _load_disk_cache() -> dict[str, str]:
    path = _disk_cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _store_disk_cache(key: str, digest: str) -> None:
    from speculators_core.fsutil import atomic_file

    try:
        data = _load_disk_cache()
        data[key] = digest
        with atomic_file(_disk_cache_path()) as tmp:
            tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
    except OSError as err:  # a read-only cache only costs time
        logger.debug("could not write the fingerprint cache: %s", err)


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, cached by path, size, inode and mtime."""
    file = Path(path)
    key = _file_key(file)
    with _lock:
        if key in _memo:
            return _memo[key]
    cached = _load_disk_cache().get(key)
    if cached is None:
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        cached = digest.hexdigest()
        _store_disk_cache(key, cached)
    with _lock:
        _memo[key] = cached
    return cached


def _canonical_config(folder: Path) -> str:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise VerifierError(f"verifier '{folder}' has no config.json; pass a model folder")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise VerifierError(f"'{cfg}' is not valid JSON: {err.msg}") from None
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(data, sort_keys=True)


def verifier_fingerprint(folder: str | os.PathLike[str]) -> str:
    """SHA-256 hex over the verifier's config and weight files (see the module docs)."""
    path = Path(folder)
    if not path.is_dir():
        raise VerifierError(f"verifier '{path}' does not exist; pass a local model folder")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise VerifierError(
            f"verifier '{path}' has no weight files ({', '.join(WEIGHT_SUFFIXES)}); pass a model folder"
        )
    digest = hashlib.sha256()
    digest.update(b"config\0" + _canonical_config(path).encode() + b"\0")
    for weight in weights:
        digest.update(f"weights\0{weight.name}\0{file_digest(weight)}\0".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(folder: str | os.PathLike[str]) -> str:
    """SHA-256 hex over the tokenizer and chat-template files of a model folder."""
    path = Path(folder)
    digest = hashlib.sha256()
    found = False
    for name in _TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            found = True
            digest.update(f"{name}\0{file_digest(file)}\0".encode())
    if not found:
        raise VerifierError(f"'{path}' has no tokenizer files (tokenizer.json, ...)")
    return digest.hexdigest()


def short_fingerprint(fingerprint: str) -> str:
    """The first 12 hex digits, for messages."""
    return fingerprint[:12]


def check_verifier_matches(
    *,
    what: str,
    recorded_fingerprint: str,
    recorded_path: str,
    verifier: str | os.PathLike[str],
) -> None:
    """Raise :class:`VerifierMismatchError` unless ``verifier`` has ``recorded_fingerprint``.

    ``what`` names the data, e.g. ``"store 'out/hs'"``; the message reads
    ``store 'out/hs' was made from verifier 'A' (fingerprint ...), not 'B' (fingerprint ...); ...``.
    """
    actual = verifier_fingerprint(verifier)
    if actual != recorded_fingerprint:
        raise VerifierMismatchError(
            f"{what} was made from verifier '{recorded_path}' (fingerprint "
            f"{short_fingerprint(recorded_fingerprint)}), not '{verifier}' (fingerprint "
            f"{short_fingerprint(actual)}); use the verifier it was made from or make the data "
            "again with this one"
        )
