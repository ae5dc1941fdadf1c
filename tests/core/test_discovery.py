"""Discovery of really installed plugin distributions (pip-installed fixtures, in subprocesses)."""

from __future__ import annotations

import json

from _support import run_cli, run_python

FIXTURE_DISTS = {"speculators-fixture-good", "speculators-fixture-broken"}


def _fixture_rows(stdout: str) -> list[dict]:
    """Rows of ``plugins --json`` from the fixture distributions (real plugins may be installed too)."""
    return [r for r in json.loads(stdout) if r["distribution"] in FIXTURE_DISTS]


def test_installed_plugins_are_discovered(fixture_site):
    code = (
        "from speculators_core import get_host;"
        "h = get_host();"
        "print('fixture-mlp' in h.algorithms(), sorted(h.failures), h.provided_by('speculators.algorithms:fixture-mlp'))"
    )
    out = run_python(code, site=fixture_site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "True ['speculators.algorithms:broken-algo'] speculators-fixture-good 0.1.0"
    )
    # The broken plugin is reported once, as one warning line naming group:name, distribution,
    # version and the exception.
    warnings = [line for line in out.stderr.splitlines() if "could not load plugin" in line]
    assert warnings == [
        "could not load plugin speculators.algorithms:broken-algo (speculators-fixture-broken 0.2.0): "
        "ModuleNotFoundError(\"No module named 'speculators_missing_dependency'\")"
    ]


def test_help_and_plugins_work_with_a_broken_plugin(fixture_site):
    help_out = run_cli(["--help"], site=fixture_site)
    assert help_out.returncode == 0, help_out.stderr
    assert "fixture-hello" in help_out.stdout and "broken-cmd" in help_out.stdout
    assert "[UNAVAILABLE]" in help_out.stdout

    table = run_cli(["plugins"], site=fixture_site)
    assert table.returncode == 0, table.stderr
    rows = {
        line.split()[0]: line.split()
        for line in table.stdout.splitlines()[1:]
        if not line.startswith(" ")
    }
    assert rows["broken-algo"][1:] == [
        "speculators.algorithms",
        "speculators-fixture-broken",
        "0.2.0",
        "FAILED",
    ]
    assert rows["fixture-mlp"][1:] == [
        "speculators.algorithms",
        "speculators-fixture-good",
        "0.1.0",
        "ok",
    ]
    assert rows["fixture-hello"][-1] == "ok" and rows["broken-cmd"][-1] == "FAILED"
    assert "No module named 'speculators_missing_dependency'" in table.stdout


def test_plugins_json_is_valid_and_complete(fixture_site):
    out = run_cli(["plugins", "--json"], site=fixture_site)
    assert out.returncode == 0, out.stderr
    rows = _fixture_rows(out.stdout)
    by_key = {(r["group"], r["name"]): r for r in rows}
    assert set(by_key) == {
        ("speculators.algorithms", "broken-algo"),
        ("speculators.algorithms", "fixture-mlp"),
        ("speculators.commands", "broken-cmd"),
        ("speculators.commands", "fixture-hello"),
        ("speculators.converters", "fixture-layout"),
    }
    good = by_key[("speculators.algorithms", "fixture-mlp")]
    assert good["status"] == "ok"
    assert sorted(good["hooks"]) == [
        "speculators_register_algorithms",
        "speculators_register_objectives",
    ]
    assert good["distribution"] == "speculators-fixture-good" and good["version"] == "0.1.0"
    broken = by_key[("speculators.algorithms", "broken-algo")]
    assert broken["status"] == "FAILED" and "speculators_missing_dependency" in broken["error"]


def test_strict_mode_turns_a_load_failure_into_an_error(fixture_site):
    out = run_cli(["plugins"], site=fixture_site, env={"SPECULATORS_STRICT_PLUGINS": "1"})
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: could not load plugin speculators.algorithms:broken-algo (speculators-fixture-broken 0.2.0)"
        )
    )
    assert "Traceback" not in out.stderr


def test_block_list_skips_the_broken_plugin(fixture_site):
    env = {
        "SPECULATORS_DISABLE_PLUGINS": "speculators-fixture-broken",
        "SPECULATORS_STRICT_PLUGINS": "1",
    }
    out = run_cli(["plugins", "--json"], site=fixture_site, env=env)
    assert out.returncode == 0, out.stderr
    statuses = {r["name"]: r["status"] for r in _fixture_rows(out.stdout)}
    assert statuses == {
        "broken-algo": "disabled",
        "broken-cmd": "disabled",
        "fixture-mlp": "ok",
        "fixture-hello": "ok",
        "fixture-layout": "ok",
    }
    assert out.stderr == ""


def test_allow_list_loads_only_what_it_names(fixture_site):
    out = run_cli(
        ["plugins", "--json"], site=fixture_site, env={"SPECULATORS_LOAD_PLUGINS": "fixture-mlp"}
    )
    assert out.returncode == 0, out.stderr
    statuses = {r["name"]: r["status"] for r in _fixture_rows(out.stdout)}
    assert statuses == {
        "broken-algo": "disabled",
        "broken-cmd": "disabled",
        "fixture-mlp": "ok",
        "fixture-hello": "disabled",
        "fixture-layout": "disabled",
    }


def test_plugin_command_runs_and_says_where_it_comes_from(fixture_site):
    out = run_cli(["fixture-hello", "--name", "ci"], site=fixture_site)
    assert out.returncode == 0 and out.stdout.strip() == "hello ci from speculators-fixture-good"
    helped = run_cli(["fixture-hello", "--help"], site=fixture_site)
    assert "Provided by speculators-fixture-good 0.1.0." in helped.stdout


def test_broken_command_is_a_placeholder_that_explains(fixture_site):
    out = run_cli(["broken-cmd", "--anything"], site=fixture_site)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: command 'broken-cmd' from speculators-fixture-broken 0.2.0 is unavailable"
    )
    assert "speculators_missing_dependency" in last


def test_selecting_a_broken_algorithm_chains_the_cause(fixture_site):
    code = (
        "from speculators_core import get_host\n"
        "try:\n"
        "    get_host().algorithm('broken-algo')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, '|', e, '|', type(e.__cause__).__name__)\n"
    )
    out = run_python(code, site=fixture_site)
    assert out.stdout.strip() == (
        "PluginError | algorithm 'broken-algo' is provided by speculators-fixture-broken 0.2.0, which failed "
        "to load: ModuleNotFoundError(\"No module named 'speculators_missing_dependency'\"); fix or reinstall "
        "it (see 'speculators plugins') | ModuleNotFoundError"
    )


def test_automodel_loads_a_discovered_speculator_without_remote_code(
    fixture_site, tmp_path, tiny_verifier
):
    code = f"""
import torch, speculators_core
from transformers import AutoModel
from speculators_fixture_good.plugin import FixtureMlpSpeculator
m = FixtureMlpSpeculator.from_verifier({str(tiny_verifier)!r})
m.save_pretrained({str(tmp_path / "d")!r})
again = AutoModel.from_pretrained({str(tmp_path / "d")!r})
print(type(again).__name__, all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values())))
"""
    out = run_python(code, site=fixture_site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "FixtureMlpSpeculator True"


def test_the_repository_plugins_are_installed_and_load():
    """The real plugin distributions of this repository are discovered (strict: none may fail)."""
    out = run_cli(["plugins", "--json"], env={"SPECULATORS_STRICT_PLUGINS": "1"})
    assert out.returncode == 0, out.stderr
    rows = {(r["group"], r["name"]): r for r in json.loads(out.stdout)}
    eagle3 = rows[("speculators.algorithms", "eagle3")]
    assert eagle3["distribution"] == "speculators-eagle3" and eagle3["status"] == "ok"
    assert eagle3["hooks"] == ["speculators_register_algorithms"]
