"""DFlash interoperability with the real upstream ``speculators==0.9.0``, both ways.

* Upstream -> here: DFlash drafts written by upstream (``tests/upstream/fixtures``, made by
  ``tests/upstream/make_fixtures.py`` in the upstream venv: two full-attention layers with a
  reduced vocabulary, and the trainer's default sliding-window layer with its causal block)
  load here with every tensor unchanged, and give upstream's block logits and loss (``ce`` with
  D-PACE weights) on fixed anchors.
* Here -> upstream: folders written here load in upstream's ``SpeculatorModel`` (its venv,
  ``tests/upstream/check_checkpoint.py``) with the same logits and loss.

The upstream venv is found as in the EAGLE-3 plugin's ``test_eagle3_upstream.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dflash_helpers import AUX_IDS, packed_row
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from speculators_dflash import DFlashDraftModel

from speculators_core import load_speculator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
FIXTURES = HERE / "upstream" / "fixtures"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "draft").is_dir())
BATCH_KEYS = ("input_ids", "hidden_states", "loss_mask", "position_ids", "document_ids")


def upstream_python() -> Path:
    sys.path.insert(0, str(REPO / "plugins" / "eagle3" / "tests"))
    from test_eagle3_upstream import upstream_python as find

    return find()


def block_logits(model: DFlashDraftModel, batch: dict[str, torch.Tensor], anchors) -> Any:
    n_aux = model.config.num_aux_states
    with torch.no_grad():
        h = model.block_states(
            batch["hidden_states"][0, :, :n_aux].flatten(1),
            batch["input_ids"][0],
            batch["position_ids"][0],
            batch["document_ids"][0],
            anchors,
        )
        return model.lm_head(model.norm(h))


def test_fixtures_exist() -> None:
    assert CASES == ["dflash_sliding_window_default", "dflash_two_full_layers_draft_vocab"]


@pytest.mark.parametrize("case", CASES)
def test_upstream_dflash_gives_upstream_logits_and_loss(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = FIXTURES / case
    meta = json.loads((folder / "meta.json").read_text())
    io = load_file(str(folder / "io.safetensors"))
    model = load_speculator(folder / "draft", verifier=folder / "verifier").eval()
    assert type(model) is DFlashDraftModel
    assert model.config.block_size == meta["block_size"]
    assert model.causal_block == (not meta["options"]["full_attention"])
    batch = {key: io[key] for key in BATCH_KEYS}
    torch.testing.assert_close(
        block_logits(model, batch, io["anchors"]), io["logits"], rtol=1e-5, atol=1e-5
    )
    monkeypatch.setattr(DFlashDraftModel, "choose_anchors", lambda self, *a: io["anchors"])
    out = model.training_step(batch)
    # Upstream divides by (count + 1e-5); the rest is the same weighted sum.
    assert out.loss.item() == pytest.approx(io["loss"].item(), rel=1e-4)

    model.save_pretrained(tmp_path / "again")
    with (
        safe_open(str(folder / "draft" / "model.safetensors"), framework="pt") as theirs,
        safe_open(str(tmp_path / "again" / "model.safetensors"), framework="pt") as ours,
    ):
        assert set(theirs.keys()) == set(ours.keys())
        for name in theirs.keys():  # noqa: SIM118
            a, b = theirs.get_tensor(name), ours.get_tensor(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name


VARIANTS: dict[str, dict[str, Any]] = {
    "dflash_one_layer_full_vocab": {"num_layers": 1, "mask_token_id": 7},
    "dflash_two_layers_draft_vocab": {"num_layers": 2, "draft_vocab_size": 120},
}


@pytest.mark.slow
def test_dflash_written_here_loads_in_upstream(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path
) -> None:
    python = upstream_python()
    anchors = torch.tensor([4, 6, 9])
    for seed, (name, options) in enumerate(sorted(VARIANTS.items())):
        counts = torch.arange(verifier_model.config.vocab_size) % 29
        extra = {"token_counts": counts} if "draft_vocab_size" in options else {}
        model = DFlashDraftModel.from_verifier(
            tiny_verifier, aux_layer_ids=AUX_IDS, block_size=4, **options, **extra
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if param.requires_grad:
                    noise = torch.randn(param.shape, generator=generator)
                    param.copy_(1 + 0.2 * noise if "norm" in pname else 0.1 * noise)
        model.eval().save_pretrained(tmp_path / name / "draft")
        batch = packed_row(verifier_model, [14], seed=seed)
        io = {**batch, "anchors": anchors, "ours.logits": block_logits(model, batch, anchors)}
        original = DFlashDraftModel.choose_anchors
        DFlashDraftModel.choose_anchors = lambda self, *a: anchors  # type: ignore[method-assign]
        try:
            io["ours.loss"] = model.training_step(batch).loss.detach().reshape(())
        finally:
            DFlashDraftModel.choose_anchors = original  # type: ignore[method-assign]
        save_file(
            {k: v.contiguous() for k, v in io.items()}, str(tmp_path / name / "io.safetensors")
        )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(python), str(HERE / "upstream" / "check_checkpoint.py")]
        + [str(tmp_path / name) for name in sorted(VARIANTS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    report = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert len(report) == len(VARIANTS) and all("DFlashDraftModel" in r for r in report), report
    for name in sorted(VARIANTS):
        ours = load_file(str(tmp_path / name / "io.safetensors"))
        theirs = load_file(str(tmp_path / name / "upstream.safetensors"))
        torch.testing.assert_close(theirs["logits"], ours["ours.logits"], rtol=1e-4, atol=1e-4)
        assert theirs["loss"].item() == pytest.approx(ours["ours.loss"].item(), rel=1e-4)
