"""Load P-EAGLE checkpoints written by this project in upstream ``speculators`` (upstream venv).

    <upstream-venv>/bin/python plugins/eagle3/tests/upstream/check_peagle_checkpoint.py CASE_DIR [...]

Each ``CASE_DIR`` holds ``draft/`` (saved by ``speculators_eagle3``; its recorded verifier path
must exist) and ``io.safetensors`` with one unaligned document (``input_ids``,
``hidden_states``, ``loss_mask``, ``position_ids``), fixed COD elements (``anchors``,
``depths``) and this project's ``ours.logits`` (element logits) and ``ours.loss`` on them.
Upstream's ``SpeculatorModel.from_pretrained`` loads the draft and runs its forward on the same
document (aligned by its ``shift_batch``) with its COD sampler replaced by the fixed elements;
``CASE_DIR/upstream.safetensors`` gets its ``logits`` and ``loss``, and one line per case is
printed. The exit status is 1 if any difference exceeds the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import speculators.models.peagle.core as peagle_core
import torch
from safetensors.torch import load_file, save_file
from speculators import SpeculatorModel, SpeculatorModelConfig
from speculators.losses.eager import kl_div_loss
from speculators.models.eagle3 import shift_batch

TOLERANCE = 1e-4


def check(case: Path) -> bool:
    io = load_file(str(case / "io.safetensors"))
    config = SpeculatorModelConfig.from_pretrained(str(case / "draft"))
    config.transformer_layer_config._attn_implementation = "sdpa"
    model = SpeculatorModel.from_pretrained(str(case / "draft"), config=config).eval()
    states = io["hidden_states"][0]  # [L, n, Ht]
    aligned = shift_batch(
        {
            "input_ids": io["input_ids"][0],
            "hidden_states": states[:, :-1].flatten(1),
            "verifier_last_hidden_states": states[:, -1],
            "loss_mask": io["loss_mask"][0],
            "lengths": torch.tensor([states.shape[0]]),
            "position_ids": io["position_ids"][0],
        }
    )
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    original = peagle_core.generate_cod_sample_indices
    peagle_core.generate_cod_sample_indices = lambda **_kwargs: (io["anchors"], io["depths"])
    try:
        with torch.no_grad():
            _none, loss, _metrics = model(
                hidden_states=aligned["hidden_states"][None],
                input_ids=aligned["input_ids"][None],
                document_ids=torch.zeros_like(aligned["input_ids"])[None],
                loss_mask=aligned["loss_mask"][None],
                position_ids=aligned["position_ids"][None],
                verifier_last_hidden_states=aligned["verifier_last_hidden_states"][None],
                loss_config={"kl_div": (kl_div_loss, 1.0)},
                num_depths=int(io["depths"].max()) + 1,
            )
    finally:
        peagle_core.generate_cod_sample_indices = original
        hook.remove()
    logits = captured[0][0]
    save_file(
        {"logits": logits.contiguous(), "loss": loss.reshape(())},
        str(case / "upstream.safetensors"),
        metadata={"format": "pt"},
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
        print("usage: check_peagle_checkpoint.py CASE_DIR [CASE_DIR ...]", file=sys.stderr)
        return 2
    results = [check(Path(arg)) for arg in sys.argv[1:]]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
