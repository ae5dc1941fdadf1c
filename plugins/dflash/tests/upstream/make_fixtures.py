"""Write the upstream-made DFlash fixtures (run in the upstream venv, not the project's).

    <upstream-venv>/bin/python plugins/dflash/tests/upstream/make_fixtures.py \
        plugins/dflash/tests/upstream/fixtures

For each case below this builds a tiny random verifier (the EAGLE-3 fixtures' own
``make_verifier``), builds a DFlash draft the way upstream's trainer does
(``create_transformer_layer_config``, ``DFlashDraftModel.from_training_args``), perturbs every
draft weight, saves it with upstream's ``save_pretrained``, and runs upstream's forward on one
unshifted document with the anchors fixed (upstream draws them at random; its ``select_anchors``
is replaced by one returning ``ANCHORS``): every block slot's logits and the loss (eager ``ce``
with D-PACE weights, upstream's DFlash default) are stored.

Each case folder holds ``draft/``, ``verifier/``, ``io.safetensors`` and ``meta.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import speculators.models.dflash.core as dflash_core
import torch
from safetensors.torch import save_file
from speculators.losses.eager import ce_loss
from speculators.models.dflash import DFlashDraftModel
from speculators.train.cli import create_transformer_layer_config
from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "eagle3" / "tests" / "upstream"))
from make_fixtures import VOCAB, make_verifier, verifier_subset  # noqa: E402

AUX_IDS = [1, 2, 3]
LENGTH = 20
BLOCK = 4
MASK_TOKEN = 5
ANCHORS = [4, 7, 9, 13]
HIDDEN = 32

CASES = {
    "dflash_two_full_layers_draft_vocab": {
        "verifier_type": "llama",
        "num_layers": 2,
        "draft_vocab_size": 48,
        "full_attention": True,
    },
    "dflash_sliding_window_default": {
        "verifier_type": "qwen3",
        "num_layers": 1,
        "draft_vocab_size": VOCAB,
        "full_attention": False,  # the trainer's default: sliding window 2048, causal block
    },
}


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def document(generator: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.ones(LENGTH, dtype=torch.long)
    mask[:3] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=generator),
        "hidden_states": torch.randn(LENGTH, len(AUX_IDS) + 1, HIDDEN, generator=generator),
        "loss_mask": mask,
        "position_ids": torch.arange(LENGTH),
    }


def run_upstream(
    model: DFlashDraftModel, doc: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's forward with the anchors fixed: block logits ``[A, B, Vd]`` and the loss."""
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    original = dflash_core.select_anchors
    anchors = torch.tensor(ANCHORS)
    dflash_core.select_anchors = lambda *_a, **_k: (
        anchors,
        torch.ones_like(anchors, dtype=torch.bool),
    )
    try:
        with torch.no_grad():
            _none, loss, _metrics = model(
                hidden_states=doc["hidden_states"][:, :-1].flatten(1)[None],
                input_ids=doc["input_ids"][None],
                loss_mask=doc["loss_mask"][None],
                verifier_last_hidden_states=doc["hidden_states"][:, -1][None],
                document_ids=torch.zeros(1, LENGTH, dtype=torch.long),
                position_ids=doc["position_ids"][None],
                loss_config={"ce": (ce_loss, 1.0)},
                per_position_loss_weight="dpace",
                dpace_alpha=0.5,
                max_anchors=len(ANCHORS),
            )
    finally:
        dflash_core.select_anchors = original
        hook.remove()
    (logits,) = captured
    return logits[0].reshape(len(ANCHORS), BLOCK, -1), loss


def make_case(root: Path, name: str, options: dict[str, Any], seed: int) -> None:
    case_dir = root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        verifier = Path(tmp) / "verifier"
        make_verifier(verifier, options["verifier_type"], seed)
        verifier_subset(verifier, case_dir / "verifier")
        generator = torch.Generator().manual_seed(seed + 1)
        counts = torch.randint(0, 50, (VOCAB,), generator=generator)
        d2t = t2d = None
        if options["draft_vocab_size"] != VOCAB:
            token_freq = {i: int(c) for i, c in enumerate(counts.tolist()) if c > 0}
            d2t, t2d = build_vocab_mappings_from_distribution(
                token_freq, options["draft_vocab_size"], VOCAB
            )
        layers = options["num_layers"]
        layer_config = create_transformer_layer_config(
            verifier_name_or_path=str(verifier),
            num_layers=layers,
            draft_arch="qwen3",
            hidden_act=None,
            sliding_window=2048,
            full_attention_indices=list(range(layers)) if options["full_attention"] else [],
        )
        model = DFlashDraftModel.from_training_args(
            verifier_config=layer_config,
            t2d=t2d,
            d2t=d2t,
            verifier_name_or_path=str(verifier),
            target_layer_ids=AUX_IDS,
            draft_vocab_size=options["draft_vocab_size"],
            block_size=BLOCK,
            mask_token_id=MASK_TOKEN,
            draft_attn_impl="sdpa",
        )
        perturb(model, seed + 2)
        model.eval()
        doc = document(generator)
        logits, loss = run_upstream(model, doc)
        model.config.speculators_config.verifier.name_or_path = "verifier"
        model.save_pretrained(case_dir / "draft")
        for extra in (case_dir / "draft").glob("*.py"):
            extra.unlink()
    tensors = {
        **{key: value[None] for key, value in doc.items()},
        "document_ids": torch.zeros(1, LENGTH, dtype=torch.long),
        "anchors": torch.tensor(ANCHORS),
        "logits": logits.contiguous(),
        "loss": loss.detach().reshape(()),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(case_dir / "io.safetensors"))
    meta = {
        "made_by": "plugins/dflash/tests/upstream/make_fixtures.py",
        "speculators": version("speculators"),
        "transformers": version("transformers"),
        "torch": version("torch"),
        "seed": seed,
        "block_size": BLOCK,
        "mask_token_id": MASK_TOKEN,
        "aux_layer_ids": AUX_IDS,
        "options": options,
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {case_dir}")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_fixtures.py OUTPUT_DIR")
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    for seed, (name, options) in enumerate(sorted(CASES.items())):
        make_case(root, name, options, seed=700 + 10 * seed)


if __name__ == "__main__":
    main()
