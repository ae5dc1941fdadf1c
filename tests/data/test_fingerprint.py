"""Verifier fingerprints: content-based, blind to volatile config fields, cached but not stale."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from speculators_core.data.errors import VerifierError, VerifierMismatchError
from speculators_core.data.fingerprint import (
    check_verifier_matches,
    tokenizer_fingerprint,
    verifier_fingerprint,
)


@pytest.fixture()
def copy(tiny_verifier: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_verifier, tmp_path / "copy"))


def test_same_content_same_fingerprint(tiny_verifier: Path, copy: Path, other_verifier: Path):
    """A copy elsewhere has the same fingerprint; other weights a different one."""
    assert verifier_fingerprint(copy) == verifier_fingerprint(tiny_verifier)
    assert verifier_fingerprint(other_verifier) != verifier_fingerprint(tiny_verifier)
    assert tokenizer_fingerprint(other_verifier) == tokenizer_fingerprint(tiny_verifier)


def test_config_changes(copy: Path, tiny_verifier: Path):
    """transformers_version does not count; a real field does."""
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (copy / "config.json").write_text(json.dumps(config))
    assert verifier_fingerprint(copy) == verifier_fingerprint(tiny_verifier)
    config["rms_norm_eps"] = 0.5
    (copy / "config.json").write_text(json.dumps(config))
    assert verifier_fingerprint(copy) != verifier_fingerprint(tiny_verifier)


def test_rewritten_weights_are_hashed_again(copy: Path, tiny_verifier: Path):
    """Same size, new bytes, new mtime: the cached digest is not reused."""
    before = verifier_fingerprint(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert verifier_fingerprint(copy) != before


def test_check_helper_message(tiny_verifier: Path, other_verifier: Path):
    recorded = verifier_fingerprint(tiny_verifier)
    check_verifier_matches(
        what="store 's'", recorded_fingerprint=recorded, recorded_path="A", verifier=tiny_verifier
    )
    with pytest.raises(VerifierMismatchError) as info:
        check_verifier_matches(
            what="store 's'",
            recorded_fingerprint=recorded,
            recorded_path="A",
            verifier=other_verifier,
        )
    assert str(info.value).startswith(
        f"store 's' was made from verifier 'A' (fingerprint {recorded[:12]}), not '{other_verifier}'"
    )


def test_folder_without_weights(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VerifierError, match="has no weight files"):
        verifier_fingerprint(tmp_path)
