"""The plugin host with isolated, directly registered plugins (no entry points)."""

from __future__ import annotations

import types

import pytest
from speculators_fixture_good import plugin as fixture_plugin

from speculators_core import Algorithm, PluginError, PluginHost, PluginSettings, hookimpl
from speculators_core.plugins.host import EntryPointInfo


def _module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(module, key, fn)
    return module


def _host(*plugins) -> PluginHost:
    return PluginHost(PluginSettings(), entry_points=False, plugins=list(plugins))


def test_speculators_register_algorithms():
    host = _host(("speculators.algorithms:fixture-mlp", fixture_plugin))
    algos = host.algorithms()
    assert list(algos) == ["fixture-mlp"]
    assert algos["fixture-mlp"].model_class is fixture_plugin.FixtureMlpSpeculator
    assert algos["fixture-mlp"].provided_by == "plugin speculators.algorithms:fixture-mlp"


def test_speculators_register_proposal_methods():
    """The core's greedy proposal arrives through the same hook as any plugin's."""
    from speculators_core.config import TokenProposalConfig

    class TreeConfig(TokenProposalConfig):
        proposal_type: str = "tree"

    from speculators_core.plugins.records import ProposalMethod

    extra = _module(
        "tree_plugin",
        speculators_register_proposal_methods=hookimpl(
            lambda: [ProposalMethod(name="tree", config_class=TreeConfig)]
        ),
    )
    host = _host(("speculators.plugins:tree", extra))
    assert sorted(host.proposal_methods()) == ["greedy", "tree"]
    assert host.proposal_methods()["greedy"].provided_by == "speculators-core (built in)"
    assert host.hooks_of("speculators.core:builtin") == [
        "speculators_register_objectives",
        "speculators_register_proposal_methods",
        "speculators_training_callbacks",
    ]


def test_speculators_register_converters():
    from speculators_core import Converter

    def detect(path, config):
        return "midlayer" in config

    def convert(source, *, verifier, output, **options):
        raise NotImplementedError

    conv = _module(
        "conv_plugin",
        speculators_register_converters=hookimpl(
            lambda: [
                Converter(
                    name="toy-format", algorithm="fixture-mlp", detect=detect, convert=convert
                )
            ]
        ),
    )
    host = _host(("speculators.converters:toy-format", conv))
    assert host.converter("toy-format").detect(None, {"midlayer": 1})
    with pytest.raises(
        PluginError,
        match=r"no installed plugin provides converter 'other' \(installed: toy-format\)",
    ):
        host.converter("other")


def test_speculators_training_callbacks():
    sentinel = object()
    seen = []

    def contribute(args):
        seen.append(args)
        return [sentinel]

    cb = _module("cb_plugin", speculators_training_callbacks=hookimpl(contribute))
    host = _host(("speculators.plugins:cb", cb))
    args = types.SimpleNamespace(report_to=[])
    assert sentinel in host.training_callbacks(args)
    assert seen == [args]


def test_same_algorithm_twice_names_both_providers():
    twin = _module(
        "twin",
        speculators_register_algorithms=hookimpl(
            lambda: [
                Algorithm(
                    name="fixture-mlp",
                    config_class=fixture_plugin.FixtureMlpConfig,
                    model_class=fixture_plugin.FixtureMlpSpeculator,
                )
            ]
        ),
    )
    host = _host(
        ("speculators.algorithms:fixture-mlp", fixture_plugin), ("speculators.plugins:twin", twin)
    )
    with pytest.raises(PluginError) as info:
        host.algorithms()
    message = str(info.value)
    assert "algorithm 'fixture-mlp' is provided twice" in message
    assert (
        "plugin speculators.algorithms:fixture-mlp" in message
        and "plugin speculators.plugins:twin" in message
    )


def test_hook_with_unknown_argument_is_refused():
    """pluggy checks implementations against specs at registration."""
    bad = _module("bad", speculators_register_algorithms=hookimpl(lambda nonsense: []))
    with pytest.raises(Exception, match="nonsense"):
        _host(("speculators.plugins:bad", bad)).algorithms()


def test_unknown_hook_is_refused():
    typo = _module("typo", speculators_register_algorithm=hookimpl(lambda: []))
    with pytest.raises(PluginError, match="speculators_register_algorithm"):
        _host(("speculators.plugins:typo", typo)).algorithms()


def test_algorithm_record_must_match_its_config():
    wrong = _module(
        "wrong",
        speculators_register_algorithms=hookimpl(
            lambda: [
                Algorithm(
                    name="other-name",
                    config_class=fixture_plugin.FixtureMlpConfig,
                    model_class=fixture_plugin.FixtureMlpSpeculator,
                )
            ]
        ),
    )
    with pytest.raises(PluginError, match="declares speculators_model_type 'fixture-mlp'"):
        _host(("speculators.plugins:wrong", wrong)).algorithms()


def test_no_host_is_built_at_import():
    import subprocess
    import sys

    code = (
        "import speculators_core, speculators_core.plugins.host as h;"
        "print(h.get_host.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize(
    ("settings", "blocked"),
    [
        (PluginSettings(disabled=frozenset({"hass"})), "disabled by SPECULATORS_DISABLE_PLUGINS"),
        (
            PluginSettings(disabled=frozenset({"speculators.algorithms:hass"})),
            "disabled by SPECULATORS_DISABLE_PLUGINS",
        ),
        (
            PluginSettings(disabled=frozenset({"speculators-hass"})),
            "disabled by SPECULATORS_DISABLE_PLUGINS",
        ),
        (PluginSettings(enabled=frozenset({"eagle3"})), "not in SPECULATORS_LOAD_PLUGINS"),
        (PluginSettings(enabled=frozenset({"hass"})), None),
        (PluginSettings(), None),
    ],
)
def test_block_and_allow_lists_match_name_key_or_distribution(settings, blocked):
    info = EntryPointInfo(
        "speculators.algorithms", "hass", "speculators_hass.plugin", "speculators-hass", "0.1.0"
    )
    assert settings.blocked_reason(info) == blocked


def test_settings_from_environment():
    settings = PluginSettings.from_env(
        {
            "SPECULATORS_STRICT_PLUGINS": "1",
            "SPECULATORS_DISABLE_PLUGINS": "a, b",
            "SPECULATORS_LOAD_PLUGINS": "c",
        }
    )
    assert settings == PluginSettings(
        strict=True, disabled=frozenset({"a", "b"}), enabled=frozenset({"c"})
    )
    assert PluginSettings.from_env({}) == PluginSettings()
