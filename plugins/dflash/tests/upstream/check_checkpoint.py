"""Load DFlash checkpoints written by this project in upstream ``speculators`` (upstream venv).

    <upstream-venv>/bin/python plugins/dflash/tests/upstream/check_checkpoint.py CASE_DIR [...]

Each ``CASE_DIR`` holds ``draft/`` (saved by ``speculators_dflash``; its recorded verifier path
must exist) and ``io.safetensors``: one unshifted document (``input_ids``, ``hidden_states``,
``loss_mask``, ``position_ids``), fixed ``anchors``, and this project's ``ours.logits``
(``[A, B, Vd]``) and ``ours.loss`` (``ce`` with D-PACE weights). Upstream's
``SpeculatorModel.from_pretrained`` loads the draft and runs its forward with its anchor sampler
replaced by the fixed anchors; ``CASE_DIR/upstream.safetensors`` gets its ``logits`` and
``loss``. One line per case; exit status 1 if a difference exceeds the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import speculators.models.dflash.core as dflash_core
import torch
from safetensors.torch import load_file, save_file
from speculators import SpeculatorModel, SpeculatorModelConfig
from speculators.losses.eager import ce_loss

TOLERANCE = 1e-4


def check(case: Path) -> bool:
    io = load_file(str(case / "io.safetensors"))
    config = SpeculatorModelConfig.from_pretrained(str(case / "draft"))
    config.transformer_layer_config._attn_implementation = "sdpa"
    model = SpeculatorModel.from_pretrained(str(case / "draft"), config=config).eval()
    anchors = io["anchors"]
    states = io["hidden_states"][0]
    length = states.shape[0]
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    original = dflash_core.select_anchors
    dflash_core.select_anchors = lambda *_a, **_k: (
        anchors,
        torch.ones_like(anchors, dtype=torch.bool),
    )
    try:
        with torch.no_grad():
            _none, loss, _metrics = model(
                hidden_states=states[:, :-1].flatten(1)[None],
                input_ids=io["input_ids"],
                loss_mask=io["loss_mask"],
                verifier_last_hidden_states=states[:, -1][None],
                document_ids=torch.zeros(1, length, dtype=torch.long),
                position_ids=io["position_ids"],
                loss_config={"ce": (ce_loss, 1.0)},
                per_position_loss_weight="dpace",
                dpace_alpha=0.5,
                max_anchors=anchors.numel(),
            )
    finally:
        dflash_core.select_anchors = original
        hook.remove()
    logits = captured[0][0].reshape(io["ours.logits"].shape)
    save_file(
        {"logits": logits.contiguous(), "loss": loss.reshape(())},
        str(case / "upstream.safetensors"),
    )
    logit_diff = (logits - io["ours.logits"]).abs().max().item()
    loss_diff = abs(loss.item() - io["ours.loss"].item())
    ok = logit_diff <= TOLERANCE and loss_diff <= TOLERANCE
    print(
        f"{'ok  ' if ok else 'FAIL'} {case.name}: upstream {type(model).__name__}, "
        f"max |logit diff| {logit_diff:.3g}, |loss diff| {loss_diff:.3g}"
    )
    return ok


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: check_checkpoint.py CASE_DIR [CASE_DIR ...]", file=sys.stderr)
        return 2
    return 0 if all([check(Path(arg)) for arg in sys.argv[1:]]) else 1


if __name__ == "__main__":
    sys.exit(main())
