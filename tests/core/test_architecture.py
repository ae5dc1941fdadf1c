"""The core's layering: no import cycle, and the schema and model base class need no plugin host."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "speculators_core"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of nodes under ``if TYPE_CHECKING:`` (never executed, so not real imports)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _import_graph() -> dict[str, set[str]]:
    """Core module -> core modules it imports, at module level or inside functions."""
    files = {_module_name(p): p for p in CORE.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_nodes(tree)
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                deps.update(filter(None, (known(alias.name) for alias in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + [base] * bool(base))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    found = target if target in files else known(base)
                    if found:
                        deps.add(found)
        deps.discard(module)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (plain Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_walk_sees_function_level_imports():
    """The walk is not blind: config -> errors (module level) and loading's edges are seen."""
    graph = _import_graph()
    assert "speculators_core.errors" in graph["speculators_core.config"]
    assert {
        "speculators_core.config",
        "speculators_core.model",
        "speculators_core.plugins.host",
    } <= (graph["speculators_core.loading"])
    # A planted cycle is found.
    planted = {**graph, "speculators_core.errors": {"speculators_core.config"}}
    assert any("speculators_core.config" in c for c in _cycles(planted))


def test_no_import_cycle_among_core_modules():
    assert _cycles(_import_graph()) == []


@pytest.mark.parametrize("module", ["speculators_core.config", "speculators_core.model"])
def test_schema_and_model_never_reach_for_a_plugin_host(module):
    graph = _import_graph()
    assert not graph[module] & {
        "speculators_core.plugins.host",
        "speculators_core.loading",
        "speculators_core.plugins",
    }
    source = (CORE.parent / (module.replace(".", "/") + ".py")).read_text()
    assert "get_host" not in source


def test_building_a_config_and_a_model_loads_no_plugin(tmp_path):
    """A config and a model built (saved, reloaded) in code import no plugin and build no host."""
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from speculators_core.config import (
            GreedyTokenProposalConfig, SpeculatorModelConfig, SpeculatorsConfig, VerifierConfig,
        )
        from speculators_core.model import SpeculatorModel
        import speculators_core.plugins.host as host_module

        class ToyConfig(SpeculatorModelConfig):
            speculators_model_type: str = "toy"
            hidden_size: int = 8

        class Toy(SpeculatorModel):
            config_class = ToyConfig
            def __init__(self, config):
                super().__init__(config)
                self.fc = torch.nn.Linear(config.hidden_size, config.hidden_size)
                self.post_init()

        config = ToyConfig(speculators_config=SpeculatorsConfig(
            algorithm="toy",
            proposal_methods=[{{"proposal_type": "greedy", "speculative_tokens": 3}}],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path="v", architectures=["LlamaForCausalLM"]),
        ))
        assert isinstance(config.speculators_config.proposal_methods[0], GreedyTokenProposalConfig)
        model = Toy(config)
        model.save_pretrained({str(tmp_path / "toy")!r})
        again = Toy.from_pretrained({str(tmp_path / "toy")!r})
        assert torch.equal(again.fc.weight, model.fc.weight)
        plugins = sorted(
            m for m in sys.modules
            if m.startswith(("speculators_eagle3", "speculators_hass", "speculators_converters",
                             "speculators_fixture"))
        )
        print("plugins", plugins, "hosts", host_module.get_host.cache_info().currsize)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "plugins [] hosts 0"
