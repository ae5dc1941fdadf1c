"""Shared pytest fixtures: isolated plugin hosts, the fixture plugin, tiny verifiers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
GOOD_PLUGIN_SRC = FIXTURES / "good_plugin"
BROKEN_PLUGIN_SRC = FIXTURES / "broken_plugin"

# The fixture plugin's module is importable in-process for unit tests (no entry points are
# installed by this: discovery tests install the real distributions, see ``fixture_site``).
for _path in (GOOD_PLUGIN_SRC, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture
def fixture_host():
    """An isolated plugin host that knows the fixture algorithm (pass it where a host is taken)."""
    from speculators_fixture_good import plugin

    from speculators_core.plugins.host import PluginHost, PluginSettings

    return PluginHost(
        PluginSettings(),
        entry_points=False,
        plugins=[("speculators.algorithms:fixture-mlp", plugin)],
    )


@pytest.fixture(scope="session")
def tiny_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a real tokenizer and chat template (built once per session)."""
    from speculators_core.testing import make_tiny_verifier

    return make_tiny_verifier(tmp_path_factory.mktemp("tiny-verifier"))


@pytest.fixture(scope="session")
def fixture_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good and the broken fixture distributions, really installed with pip into a folder.

    Subprocesses put the folder on PYTHONPATH, so entry-point discovery sees real installed
    distributions (entry points are cached in-process, hence the subprocesses).
    """
    site = tmp_path_factory.mktemp("fixture-site")
    # Build from copies: pip leaves build/ and *.egg-info next to the sources it builds, and an
    # egg-info in tests/fixtures/good_plugin (on sys.path above) would make the fixture's entry
    # points visible to every in-process plugin host of the session.
    sources = tmp_path_factory.mktemp("fixture-sources")
    copies = []
    for src in (GOOD_PLUGIN_SRC, BROKEN_PLUGIN_SRC):
        copy = sources / src.name
        shutil.copytree(
            src, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        )
        copies.append(str(copy))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
            str(site),
            *copies,
        ],
        check=True,
        capture_output=True,
    )
    return site


@pytest.fixture
def no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Clear SPECULATORS_* plugin switches for the duration of a test."""
    for key in list(os.environ):
        if key.startswith("SPECULATORS_") and "PLUGINS" in key:
            monkeypatch.delenv(key)
    yield
