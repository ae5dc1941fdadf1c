"""The plugin-author guide's worked example runs as written, and its contract sections match the code."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from speculators_core import PluginHost, PluginSettings, load_speculator
from speculators_core.check import check_checkpoint
from speculators_core.train.metrics import derive_metrics

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "plugin-authors.md"


def _example_source() -> str:
    text = GUIDE.read_text()
    block = re.search(
        r"<!-- worked-example:start -->\n```python\n(.*?)```\n<!-- worked-example:end -->",
        text,
        re.S,
    )
    assert block, "docs/plugin-authors.md lost its worked example markers"
    return block.group(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    """The guide's code, written out as the module ``speculators_toy_guide`` and imported."""
    folder = tmp_path_factory.mktemp("toy-plugin")
    path = folder / "speculators_toy_guide.py"
    path.write_text(_example_source())
    spec = importlib.util.spec_from_file_location("speculators_toy_guide", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def toy_host(toy) -> PluginHost:
    return PluginHost(
        PluginSettings(strict=True),
        entry_points=False,
        plugins=[("speculators.algorithms:toy", toy)],
    )


def _batch(draft, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two packed rows whose next-next token is a fixed function of the state (learnable)."""
    config = draft.config
    rows, length = 2, 24
    states = torch.randn(rows, length, 1, config.hidden_size, generator=generator)
    ids = torch.randint(0, config.vocab_size, (rows, length), generator=generator)
    # x_{t+2} := argmax of a fixed projection of h_t, so the draft has something to learn.
    table = torch.randn(config.hidden_size, config.vocab_size, generator=generator)
    ids[:, 2:] = (states[:, :-2, 0] @ table).argmax(-1)
    return {
        "input_ids": ids,
        "hidden_states": states,
        "loss_mask": torch.ones(rows, length, dtype=torch.long),
        "position_ids": torch.arange(length).expand(rows, length),
        "document_ids": torch.zeros(rows, length, dtype=torch.long),
    }


def test_the_worked_example_registers_and_trains(toy_host, tiny_verifier: Path):
    """Host lookup, from_verifier, training steps that learn, and the core-derived metric."""
    record = toy_host.algorithm("toy")
    assert record.lint is not None and record.vllm is None
    assert [o.name for o in record.training_options] == ["k"]
    torch.manual_seed(0)
    draft = record.model_class.from_verifier(tiny_verifier, k=4)
    assert draft.config.speculators_config.default_proposal().speculative_tokens == 4
    batch = _batch(draft, torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(draft.parameters(), lr=3e-2)
    first = draft.training_step(batch)
    for _ in range(60):
        out = draft.training_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    last = draft.training_step(batch)
    assert last.loss < 0.5 * first.loss
    derived = derive_metrics(last)
    # One scored step: 1 + full_acc_0, weighted like full_acc_0 (recomputed here).
    assert torch.isclose(derived.metrics["est_accept_len"], 1 + last.metrics["full_acc_0"])
    assert torch.equal(derived.weights["est_accept_len"], last.weights["full_acc_0"])


def test_the_worked_example_saves_checks_and_decodes(toy_host, tiny_verifier: Path, tmp_path):
    """Save, reload through the host, the plugin's own check rule, lossless decoding."""
    from transformers import AutoModelForCausalLM

    from speculators_core.evaluate.reference import ReferenceDecoder

    torch.manual_seed(0)
    draft = toy_host.algorithm("toy").model_class.from_verifier(tiny_verifier)
    draft.save_pretrained(tmp_path / "toy")
    again = load_speculator(tmp_path / "toy", host=toy_host)
    assert type(again) is type(draft)
    assert all(torch.equal(a, b) for a, b in zip(draft.parameters(), again.parameters()))
    assert check_checkpoint(tmp_path / "toy", host=toy_host).codes == []

    verifier = AutoModelForCausalLM.from_pretrained(tiny_verifier, dtype=torch.float32)
    prompt = [1, 5, 9, 13, 2]
    alone = ReferenceDecoder(verifier, None, k=3).generate(prompt, max_new_tokens=12)
    drafted = ReferenceDecoder(verifier, again, k=3).generate(prompt, max_new_tokens=12)
    assert drafted.tokens == alone.tokens  # lossless, whatever the draft proposes

    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "toy" / "model.safetensors"))
    weights["proj.weight"] = weights["proj.weight"][:, :-1].contiguous()
    save_file(weights, str(tmp_path / "toy" / "model.safetensors"))
    assert check_checkpoint(tmp_path / "toy", host=toy_host).codes == ["toy-proj-shape"]


def test_serve_refuses_the_worked_example_in_one_line(toy_host, tiny_verifier, tmp_path):
    from speculators_core.cli.serve import serve_command

    toy_host.algorithm("toy").model_class.from_verifier(tiny_verifier).save_pretrained(
        tmp_path / "toy"
    )
    result = CliRunner().invoke(
        serve_command, [str(tmp_path / "toy"), "--print-only", "--device", "gpu"], obj=toy_host
    )
    assert result.exit_code == 1
    assert "vLLM cannot serve algorithm 'toy'" in str(result.exception)


def test_the_converter_call_is_the_documented_one(tmp_path):
    """run_conversion calls convert exactly as the guide says: an empty temporary output."""
    from speculators_core import Converter
    from speculators_core.conversion import ReferenceForward, run_conversion
    from speculators_core.errors import ConversionError

    text = GUIDE.read_text()
    assert (
        "def convert(source: Path, *, verifier: Path, output: Path, dtype: torch.dtype | None, "
        "**options) -> ReferenceForward | None"
    ) in text
    assert list(ReferenceForward.__dataclass_fields__) == [
        "forward",
        "feature_width",
        "vocab_size",
        "expected_findings",
    ]
    assert (
        "`ReferenceForward(forward, feature_width, vocab_size, expected_findings=frozenset())`"
        in (text)
    )
    calls = []

    def convert(source, **kwargs):
        calls.append((source, kwargs, sorted(p.name for p in kwargs["output"].iterdir())))
        raise ConversionError("stop here")

    record = Converter(name="rec", algorithm="toy", detect=lambda *a: True, convert=convert)
    (tmp_path / "src").mkdir()
    with pytest.raises(ConversionError, match="stop here"):
        run_conversion(
            record,
            tmp_path / "src",
            verifier=tmp_path / "v",
            output=tmp_path / "out",
            dtype="bfloat16",
            options={"speculative_tokens": 4},
        )
    ((source, kwargs, listing),) = calls
    assert source == tmp_path / "src" and listing == []
    assert kwargs["output"].parent == tmp_path and kwargs["output"] != tmp_path / "out"
    assert kwargs["dtype"] is torch.bfloat16 and kwargs["speculative_tokens"] == 4
    assert sorted(kwargs) == ["dtype", "output", "speculative_tokens", "verifier"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing left behind


def test_every_model_contract_method_and_callback_event_is_documented():
    from speculators_core.model import SpeculatorModel
    from speculators_core.train import TrainerCallback

    text = GUIDE.read_text()
    for name in (
        "from_verifier",
        "hidden_state_spec",
        "hidden_state_spec_for_verifier",
        "training_step",
        "draft_session",
        "draft_logits",
        "attach_verifier_parts",
    ):
        assert hasattr(SpeculatorModel, name)
        assert f"`{name}(" in text, f"document SpeculatorModel.{name} in the guide"
    events = [n for n in vars(TrainerCallback) if n.startswith("on_")]
    assert len(events) == 11
    for event in events:
        assert event in text, f"document the callback event {event}"
