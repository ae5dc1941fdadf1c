"""One reader of a verifier's config.json: the dict and the typed config give the same errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from speculators_core.data.errors import VerifierError
from speculators_core.data.verifier import read_verifier_config
from speculators_core.modeling.verifier import load_verifier_config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "has no config.json"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
    ],
)
@pytest.mark.parametrize("reader", [read_verifier_config, load_verifier_config])
def test_bad_verifier_config_is_one_line(
    tmp_path: Path, text: str | None, message: str, reader: Callable[[Path], Any]
) -> None:
    """A missing, invalid or non-object config.json is a one-line VerifierError for both readers."""
    if text is not None:
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(VerifierError, match=message) as err:
        reader(tmp_path)
    assert "\n" not in str(err.value)


def test_both_readers_agree(tiny_verifier: Path) -> None:
    """The dict and the typed config read the same sizes."""
    raw = read_verifier_config(tiny_verifier)
    typed = load_verifier_config(tiny_verifier)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        assert raw[key] == getattr(typed, key)
