"""Interoperability with the real upstream ``speculators==0.9.0``, in both directions.

* Upstream -> here: checkpoints written by upstream (``tests/upstream/fixtures``, made by
  ``tests/upstream/make_fixtures.py`` in the upstream venv) load here and give upstream's
  stored logits and losses on upstream's stored inputs.
* Here -> upstream: checkpoints written here are loaded by upstream's
  ``SpeculatorModel.from_pretrained`` in its own venv (``tests/upstream/check_checkpoint.py``,
  run as a subprocess) and give the same logits and losses.

The upstream venv is found through ``SPECULATORS_UPSTREAM_VENV`` (default
``.cache/upstream-venv`` in the repository); create it with
``plugins/eagle3/tests/upstream/setup_upstream_venv.sh .cache/upstream-venv``. When it is
missing the second direction is skipped locally and fails under CI (``CI`` set).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from eagle3_helpers import AUX_IDS, pack_rows, random_samples
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from speculators_eagle3 import Eagle3DraftModel
from speculators_eagle3.alignment import align_batch

from speculators_core import load_speculator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
FIXTURES = HERE / "upstream" / "fixtures"
CASES = sorted(
    p.name
    for p in FIXTURES.iterdir()
    if (p / "draft").is_dir() and not p.name.startswith("peagle_")  # test_peagle_upstream.py
)
SETUP = "plugins/eagle3/tests/upstream/setup_upstream_venv.sh"

BATCH_KEYS = ("input_ids", "hidden_states", "loss_mask", "position_ids", "document_ids")


def test_fixtures_exist() -> None:
    """The upstream-made fixtures are in the repository."""
    assert len(CASES) == 3, CASES


# ------------------------------------------------------------------ upstream -> here


@pytest.mark.parametrize("case", CASES)
def test_upstream_checkpoint_gives_upstream_logits_and_losses(case: str, tmp_path: Path) -> None:
    """An upstream-written checkpoint loads here with upstream's logits and per-step losses."""
    folder = FIXTURES / case
    meta = json.loads((folder / "meta.json").read_text())
    io = load_file(str(folder / "io.safetensors"))
    model = load_speculator(folder / "draft", verifier=folder / "verifier").eval()
    assert type(model) is Eagle3DraftModel
    options = meta["options"]
    for key in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
        assert getattr(model.config, key) == options[key], key
    assert model.config.layer_config.model_type == options["draft_arch"]
    assert len(model.layers) == options["num_layers"]

    steps = meta["ttt_steps"]
    logits = model.ttt_forward(
        io["packed.aux_hidden_states"],
        io["packed.input_ids"],
        io["packed.document_ids"],
        io["packed.position_ids"],
        steps=steps,
    )
    for step in range(steps):
        torch.testing.assert_close(logits[step], io[f"packed.logits_{step}"], rtol=1e-5, atol=1e-5)

    out = model.training_step({key: io[f"single.{key}"] for key in BATCH_KEYS})
    for step in range(steps):
        # Upstream divides by (count + 1e-5); the rest is the same sum.
        assert out.metrics[f"loss_{step}"].item() == pytest.approx(
            io[f"single.loss_{step}"].item(), rel=1e-4
        )
    assert out.loss.item() == pytest.approx(io["single.loss"].item(), rel=1e-4)
    # Step 0 accuracies are defined identically (later steps: upstream also requires the
    # start position to be supervised, see loss.py).
    assert out.metrics["full_acc_0"].item() == pytest.approx(io["single.full_acc_0"].item())

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


# ------------------------------------------------------------------ here -> upstream

VARIANTS: dict[str, dict[str, Any]] = {
    "llama_draft_vocab": {"draft_vocab_size": 120, "norm_before_residual": True},
    "qwen3_two_layers_norm_before_fc": {
        "layer_type": "qwen3",
        "num_layers": 2,
        "norm_before_fc": True,
        "norm_output": True,
        "norm_before_residual": False,
    },
    "llama_fc_norm": {"fc_norm": True, "draft_vocab_size": 90, "norm_before_residual": False},
}


def upstream_python() -> Path:
    venv = Path(os.environ.get("SPECULATORS_UPSTREAM_VENV", REPO / ".cache" / "upstream-venv"))
    if not venv.is_absolute():
        venv = REPO / venv
    python = venv / "bin" / "python"
    if not python.is_file():
        message = (
            f"the upstream speculators venv is missing at '{venv}'; create it with "
            f"'bash {SETUP} {venv}' (or set SPECULATORS_UPSTREAM_VENV)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def write_case(
    folder: Path,
    verifier: Path,
    verifier_model: Any,
    options: dict[str, Any],
    seed: int,
) -> dict[str, torch.Tensor]:
    """Save a perturbed draft and the inputs, logits and losses computed on it here."""
    counts = torch.arange(verifier_model.config.vocab_size) % 29
    extra: dict[str, Any] = {"token_counts": counts} if "draft_vocab_size" in options else {}
    model = Eagle3DraftModel.from_verifier(verifier, aux_layer_ids=AUX_IDS, **options, **extra)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or name == "lm_head.weight":
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    model.eval()
    model.save_pretrained(folder / "draft")

    spec = [*AUX_IDS, 4]
    packed = pack_rows(random_samples(verifier_model, spec, [11, 8], seed=seed), 22)
    aligned = align_batch(**packed)
    logits = model.ttt_forward(
        aligned.aux_hidden_states, aligned.input_ids, aligned.document_ids, aligned.position_ids
    )
    single = random_samples(verifier_model, spec, [13], seed=seed + 1)[0]
    single_batch = pack_rows([single], 13)
    out = model.training_step(single_batch)
    io: dict[str, torch.Tensor] = {
        "packed.aux_hidden_states": aligned.aux_hidden_states,
        "packed.input_ids": aligned.input_ids,
        "packed.document_ids": aligned.document_ids,
        "packed.position_ids": aligned.position_ids,
        **{f"single.{key}": single_batch[key] for key in BATCH_KEYS},
    }
    for step, step_logits in enumerate(logits):
        io[f"ours.logits_{step}"] = step_logits.detach()
        io[f"ours.loss_{step}"] = out.metrics[f"loss_{step}"].reshape(())
    if model.d2t is not None and model.t2d is not None:
        io["ours.d2t"], io["ours.t2d"] = model.d2t, model.t2d
    save_file({k: v.contiguous() for k, v in io.items()}, str(folder / "io.safetensors"))
    return io


@pytest.mark.slow
def test_checkpoints_written_here_load_in_upstream(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path
) -> None:
    """Upstream's SpeculatorModel.from_pretrained loads our folders with the same logits/losses."""
    python = upstream_python()
    ours = {}
    for seed, (name, options) in enumerate(sorted(VARIANTS.items())):
        ours[name] = write_case(tmp_path / name, tiny_verifier, verifier_model, options, seed)
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
    assert len(report) == len(VARIANTS), result.stdout
    for name in sorted(VARIANTS):
        theirs = load_file(str(tmp_path / name / "upstream.safetensors"))
        for step in range(3):
            torch.testing.assert_close(
                theirs[f"logits_{step}"], ours[name][f"ours.logits_{step}"], rtol=1e-5, atol=1e-5
            )
            assert theirs[f"loss_{step}"].item() == pytest.approx(
                ours[name][f"ours.loss_{step}"].item(), rel=1e-4
            )
        if "ours.d2t" in ours[name]:
            assert torch.equal(theirs["d2t"], ours[name]["ours.d2t"])
            assert torch.equal(theirs["t2d"], ours[name]["ours.t2d"])
        else:
            assert "d2t" not in theirs
