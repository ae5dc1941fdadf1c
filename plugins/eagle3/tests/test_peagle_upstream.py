"""P-EAGLE interoperability with the real upstream ``speculators==0.9.0``, both ways.

* Upstream -> here: P-EAGLE drafts written by upstream (``tests/upstream/fixtures/peagle_*``,
  made by ``tests/upstream/make_peagle_fixtures.py`` in the upstream venv; upstream's trainer
  defaults, sliding-window layers included) load here with every tensor unchanged, and their
  element logits and loss on fixed COD elements are upstream's.
* Here -> upstream: P-EAGLE folders written here load in upstream's ``SpeculatorModel`` (its
  venv, ``tests/upstream/check_peagle_checkpoint.py``) with the same element logits and loss.

The upstream venv is found as in ``test_eagle3_upstream.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import speculators_eagle3.peagle as peagle
import torch
from eagle3_helpers import AUX_IDS, pack_rows, random_samples
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from speculators_eagle3.alignment import align_batch
from speculators_eagle3.peagle import PEagleDraftModel
from test_eagle3_upstream import upstream_python

from speculators_core import load_speculator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
FIXTURES = HERE / "upstream" / "fixtures"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.name.startswith("peagle_"))
BATCH_KEYS = ("input_ids", "hidden_states", "loss_mask", "position_ids", "document_ids")


def test_fixtures_exist() -> None:
    assert CASES == ["peagle_llama_two_layers_norm_before_fc", "peagle_qwen3_draft_vocab"]


def element_logits(model: PEagleDraftModel, batch: dict[str, torch.Tensor], io: dict) -> Any:
    """Our logits of the fixed elements ``io["anchors"], io["depths"]`` of the batch's row."""
    aligned = align_batch(**batch)
    with torch.no_grad():
        h = model.element_states(
            aligned.aux_hidden_states[0].to(model.fc.weight.dtype),
            aligned.input_ids[0],
            aligned.position_ids[0],
            aligned.document_ids[0],
            io["anchors"],
            io["depths"],
        )
        return model.lm_head(model.norm(h))


@pytest.mark.parametrize("case", CASES)
def test_upstream_peagle_gives_upstream_logits_and_loss(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = FIXTURES / case
    meta = json.loads((folder / "meta.json").read_text())
    io = load_file(str(folder / "io.safetensors"))
    model = load_speculator(folder / "draft", verifier=folder / "verifier").eval()
    assert type(model) is PEagleDraftModel
    assert model.config.mask_token_id == meta["mask_token_id"]
    assert len(model.layers) == meta["options"]["num_layers"]
    model.configure_training(num_depths=meta["num_depths"], noise_std=0.0)

    batch = {key: io[key] for key in BATCH_KEYS}
    torch.testing.assert_close(element_logits(model, batch, io), io["logits"], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(peagle, "cod_sample", lambda *a, **k: (io["anchors"], io["depths"]))
    out = model.training_step(batch)
    # Upstream divides by (count + 1e-5); the rest is the same mean over scored elements.
    assert out.loss.item() == pytest.approx(io["loss"].item(), rel=1e-4)

    # Written again here, the folder holds the same tensors as upstream's.
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
    "peagle_llama_draft_vocab": {"draft_vocab_size": 120, "mask_token_id": 7},
    "peagle_qwen3_two_layers": {
        "layer_type": "qwen3",
        "num_layers": 2,
        "norm_before_fc": True,
        "norm_before_residual": False,
        "mask_token_id": 3,
    },
}


def write_case(
    folder: Path, verifier: Path, verifier_model: Any, options: dict[str, Any], seed: int
) -> None:
    """Save a perturbed P-EAGLE draft with one document, fixed elements and our outputs."""
    counts = torch.arange(verifier_model.config.vocab_size) % 29
    extra: dict[str, Any] = {"token_counts": counts} if "draft_vocab_size" in options else {}
    model = PEagleDraftModel.from_verifier(
        verifier, aux_layer_ids=AUX_IDS, num_depths=3, noise_std=0.0, **options, **extra
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or name == "lm_head.weight":
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    model.eval()
    model.save_pretrained(folder / "draft")
    batch = pack_rows(random_samples(verifier_model, [*AUX_IDS, 4], [14], seed=seed), 14)
    anchors = torch.tensor([*range(13), 2, 5, 8, 2, 9, 9, 10])
    depths = torch.tensor([0] * 13 + [1, 1, 1, 2, 1, 2, 1])
    io = {**batch, "anchors": anchors, "depths": depths}
    io["ours.logits"] = element_logits(model, batch, io)
    original = peagle.cod_sample
    peagle.cod_sample = lambda *a, **k: (anchors, depths)  # type: ignore[assignment]
    try:
        io["ours.loss"] = model.training_step(batch).loss.detach().reshape(())
    finally:
        peagle.cod_sample = original  # type: ignore[assignment]
    save_file({k: v.contiguous() for k, v in io.items()}, str(folder / "io.safetensors"))


@pytest.mark.slow
def test_peagle_written_here_loads_in_upstream(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path
) -> None:
    python = upstream_python()
    for seed, (name, options) in enumerate(sorted(VARIANTS.items())):
        write_case(tmp_path / name, tiny_verifier, verifier_model, options, seed)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(python), str(HERE / "upstream" / "check_peagle_checkpoint.py")]
        + [str(tmp_path / name) for name in sorted(VARIANTS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    report = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert len(report) == len(VARIANTS) and all("PEagleDraftModel" in r for r in report), report
    for name in sorted(VARIANTS):
        ours = load_file(str(tmp_path / name / "io.safetensors"))
        theirs = load_file(str(tmp_path / name / "upstream.safetensors"))
        torch.testing.assert_close(theirs["logits"], ours["ours.logits"], rtol=1e-4, atol=1e-4)
        assert theirs["loss"].item() == pytest.approx(ours["ours.loss"].item(), rel=1e-4)
