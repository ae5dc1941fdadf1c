"""Meta-tests: every hook has a test named after it and its exact signature in the author docs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from speculators_core.plugins import hookspecs

REPO = Path(__file__).resolve().parents[2]


def _hookspecs() -> list:
    return [
        fn
        for name, fn in vars(hookspecs).items()
        if name.startswith("speculators_") and callable(fn) and hasattr(fn, "speculators_spec")
    ]


def _signature(fn) -> str:
    """``def name(arg: Ann, ...) -> Ret`` from the spec's (string) annotations."""
    params = []
    for param in inspect.signature(fn).parameters.values():
        ann = param.annotation
        params.append(f"{param.name}: {ann}" if ann is not inspect.Parameter.empty else param.name)
    ret = inspect.signature(fn).return_annotation
    return f"def {fn.__name__}({', '.join(params)}) -> {ret}"


def test_there_are_hookspecs():
    assert len(_hookspecs()) >= 4


@pytest.mark.parametrize("spec", _hookspecs(), ids=lambda fn: fn.__name__)
def test_every_hookspec_is_documented_with_its_exact_signature(spec):
    doc = (REPO / "docs" / "plugin-authors.md").read_text()
    assert _signature(spec) in doc, f"add `{_signature(spec)}` to docs/plugin-authors.md"
    assert spec.__doc__ and "Example" in spec.__doc__, "the spec's docstring needs an example"


@pytest.mark.parametrize("spec", _hookspecs(), ids=lambda fn: fn.__name__)
def test_every_hookspec_has_a_test_named_after_it(spec):
    pattern = re.compile(rf"def test_{spec.__name__}\b")
    test_files = [*REPO.glob("tests/**/test_*.py"), *REPO.glob("plugins/*/tests/**/test_*.py")]
    assert any(pattern.search(p.read_text()) for p in test_files), f"write test_{spec.__name__}"


def test_proposal_method_behaviour_is_documented_with_its_exact_signatures():
    """The ``draft``, ``accept`` and ``round`` of a ProposalMethod, as the core's own
    implementations spell them (argmax_chain, standard_rule, chain_round), appear in the author
    docs."""
    from speculators_core.proposals import argmax_chain, chain_round, standard_rule

    doc = (REPO / "docs" / "plugin-authors.md").read_text()
    for role, fn in (("draft", argmax_chain), ("accept", standard_rule), ("round", chain_round)):
        params = []
        for param in inspect.signature(fn).parameters.values():
            text = f"{param.name}: {param.annotation}"
            if param.default is not inspect.Parameter.empty:
                text += f" = {param.default}"
            params.append(text)
        signature = f"def {role}({', '.join(params)}) -> {inspect.signature(fn).return_annotation}"
        assert signature in doc, f"add `{signature}` to docs/plugin-authors.md"
