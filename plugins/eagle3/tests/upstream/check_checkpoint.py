"""Load checkpoints written by this project in upstream ``speculators`` and compare (upstream venv).

    <upstream-venv>/bin/python plugins/eagle3/tests/upstream/check_checkpoint.py CASE_DIR [...]

Each ``CASE_DIR`` holds ``draft/`` (a folder saved by ``speculators_eagle3``; its recorded
verifier path must exist, upstream reads the verifier's embedding, norm and LM head from it) and
``io.safetensors`` with:

* ``packed.{aux_hidden_states, input_ids, document_ids, position_ids}``: aligned inputs of a
  packed row, and ``ours.logits_{s}``: this project's per-step logits on them;
* ``single.{input_ids, hidden_states, loss_mask, position_ids}``: one unaligned document, and
  ``ours.loss_{s}``: this project's per-step losses on it.

Upstream's ``SpeculatorModel.from_pretrained`` loads the draft; its forward runs on the same
inputs (SDPA attention, eager forward KL). The results are written to
``CASE_DIR/upstream.safetensors`` (``logits_{s}``, ``loss_{s}``, and ``d2t``/``t2d`` when the draft
has them) and one line per case is printed with the largest differences. The exit status is 1
if any difference exceeds the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from speculators import SpeculatorModel, SpeculatorModelConfig
from speculators.losses.eager import kl_div_loss
from speculators.models.eagle3 import shift_batch

TOLERANCE = 1e-4


def check(case: Path) -> bool:
    io = load_file(str(case / "io.safetensors"))
    config = SpeculatorModelConfig.from_pretrained(str(case / "draft"))
    # Upstream defaults to flex attention, which has no CPU path worth using here.
    config.transformer_layer_config._attn_implementation = "sdpa"
    model = SpeculatorModel.from_pretrained(str(case / "draft"), config=config).eval()
    steps = sum(1 for key in io if key.startswith("ours.logits_"))

    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            model(
                hidden_states=io["packed.aux_hidden_states"],
                input_ids=io["packed.input_ids"],
                document_ids=io["packed.document_ids"],
                position_ids=io["packed.position_ids"],
                ttt_steps=steps,
            )
            single = io["single.hidden_states"][0]  # [L, n, Ht]
            aligned = shift_batch(
                {
                    "input_ids": io["single.input_ids"][0],
                    "hidden_states": single[:, :-1].flatten(1),
                    "verifier_last_hidden_states": single[:, -1],
                    "loss_mask": io["single.loss_mask"][0],
                    "lengths": torch.tensor([single.shape[0]]),
                    "position_ids": io["single.position_ids"][0],
                }
            )
            _tokens, _loss, metrics = model(
                hidden_states=aligned["hidden_states"][None],
                input_ids=aligned["input_ids"][None],
                document_ids=torch.zeros_like(aligned["input_ids"])[None],
                loss_mask=aligned["loss_mask"][None],
                position_ids=aligned["position_ids"][None],
                verifier_last_hidden_states=aligned["verifier_last_hidden_states"][None],
                ttt_steps=steps,
                loss_config={"kl_div": (kl_div_loss, 1.0)},
            )
    finally:
        hook.remove()

    out: dict[str, torch.Tensor] = {}
    logit_diff = loss_diff = 0.0
    for step in range(steps):
        out[f"logits_{step}"] = captured[step].contiguous()
        out[f"loss_{step}"] = metrics[f"loss_{step}_sum"].reshape(())
        logit_diff = max(
            logit_diff, (captured[step] - io[f"ours.logits_{step}"]).abs().max().item()
        )
        loss_diff = max(loss_diff, abs(out[f"loss_{step}"].item() - io[f"ours.loss_{step}"].item()))
    for name in ("d2t", "t2d"):
        buffer = getattr(model, name, None)
        if buffer is not None:
            out[name] = buffer.contiguous()
    save_file(out, str(case / "upstream.safetensors"), metadata={"format": "pt"})
    ok = logit_diff <= TOLERANCE and loss_diff <= TOLERANCE
    print(
        f"{'ok  ' if ok else 'FAIL'} {case.name}: upstream {type(model).__name__}, "
        f"max |logit diff| {logit_diff:.3g}, max |loss diff| {loss_diff:.3g}"
    )
    return ok


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: check_checkpoint.py CASE_DIR [CASE_DIR ...]", file=sys.stderr)
        return 2
    results = [check(Path(arg)) for arg in sys.argv[1:]]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
