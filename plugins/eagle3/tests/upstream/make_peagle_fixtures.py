"""Write the upstream-made P-EAGLE fixtures (run in the upstream venv, not the project's).

    <upstream-venv>/bin/python plugins/eagle3/tests/upstream/make_peagle_fixtures.py \
        plugins/eagle3/tests/upstream/fixtures

For each case below this builds a tiny random verifier (``make_fixtures.make_verifier``), builds
a P-EAGLE draft the way upstream's trainer does (``create_transformer_layer_config`` with its
default sliding window, ``PEagleDraftModel.from_training_args``), perturbs every draft weight
(the embedding and ``mask_hidden`` too: P-EAGLE trains them), saves it with upstream's
``save_pretrained`` and runs upstream's forward on one document, aligned by upstream's
``shift_batch``, with the COD elements fixed (upstream samples them at random; the fixture
replaces its sampler by one returning ``ELEMENTS``): the logits of every element and the loss
(eager forward KL) are stored.

Each case folder (``peagle_*``) holds ``draft/``, ``verifier/``, ``io.safetensors`` (the
unaligned document, the elements, upstream's logits and loss) and ``meta.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import speculators.models.peagle.core as peagle_core
import torch
from make_fixtures import VOCAB, make_verifier, sample, upstream_aligned, verifier_subset
from safetensors.torch import save_file
from speculators.losses.eager import kl_div_loss
from speculators.models.peagle import PEagleDraftModel
from speculators.train.cli import create_transformer_layer_config
from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

AUX_IDS = [1, 2, 3]
LENGTH = 16  # unaligned document length (15 aligned indices)
NUM_DEPTHS = 3
MASK_TOKEN = 5
#: (anchor, depth) of the fixed COD elements: depth 0 everywhere, then some chains.
ELEMENTS = [(a, 0) for a in range(LENGTH - 1)] + [
    (3, 1), (6, 1), (9, 1), (12, 1), (3, 2), (9, 2), (11, 1), (11, 2),
]  # fmt: skip

CASES = {
    "peagle_qwen3_draft_vocab": {
        "verifier_type": "qwen3",
        "draft_arch": "qwen3",
        "num_layers": 1,
        "draft_vocab_size": 48,
        "norm_before_residual": True,
        "norm_before_fc": False,
    },
    "peagle_llama_two_layers_norm_before_fc": {
        "verifier_type": "llama",
        "draft_arch": "llama",
        "num_layers": 2,
        "draft_vocab_size": VOCAB,
        "norm_before_residual": False,
        "norm_before_fc": True,
    },
}


def perturb_all(model: torch.nn.Module, seed: int) -> None:
    """Every trainable draft weight, the embedding and mask_hidden included, off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("verifier_") or name == "lm_head.weight":
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def fixed_elements() -> tuple[torch.Tensor, torch.Tensor]:
    anchors = torch.tensor([a for a, _ in ELEMENTS])
    depths = torch.tensor([d for _, d in ELEMENTS])
    return anchors, depths


def run_upstream(
    model: PEagleDraftModel, aligned: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's forward on the fixed elements: element logits ``[E, Vd]`` and the loss."""
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    original = peagle_core.generate_cod_sample_indices
    peagle_core.generate_cod_sample_indices = lambda **_kwargs: fixed_elements()
    try:
        with torch.no_grad():
            _none, loss, _metrics = model(
                hidden_states=aligned["hidden_states"][None],
                input_ids=aligned["input_ids"][None],
                document_ids=torch.zeros_like(aligned["input_ids"])[None],
                loss_mask=aligned["loss_mask"][None],
                position_ids=aligned["position_ids"][None],
                verifier_last_hidden_states=aligned["verifier_last_hidden_states"][None],
                loss_config={"kl_div": (kl_div_loss, 1.0)},  # eager: the fused one needs Triton
                num_depths=NUM_DEPTHS,
            )
    finally:
        peagle_core.generate_cod_sample_indices = original
        hook.remove()
    (logits,) = captured
    return logits[0], loss


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
        token_freq = {i: int(c) for i, c in enumerate(counts.tolist()) if c > 0}
        d2t = t2d = None
        if options["draft_vocab_size"] != VOCAB:
            d2t, t2d = build_vocab_mappings_from_distribution(
                token_freq, options["draft_vocab_size"], VOCAB
            )
        # The trainer's default: every layer sliding-window attention, window 2048.
        layer_config = create_transformer_layer_config(
            verifier_name_or_path=str(verifier),
            num_layers=options["num_layers"],
            draft_arch=options["draft_arch"],
            hidden_act=None,
            sliding_window=2048,
            full_attention_indices=[],
        )
        model = PEagleDraftModel.from_training_args(
            verifier_config=layer_config,
            t2d=t2d,
            d2t=d2t,
            verifier_name_or_path=str(verifier),
            target_layer_ids=AUX_IDS,
            draft_vocab_size=options["draft_vocab_size"],
            norm_before_residual=options["norm_before_residual"],
            norm_before_fc=options["norm_before_fc"],
            mask_token_id=MASK_TOKEN,
            num_depths=NUM_DEPTHS,
            draft_attn_impl="sdpa",
        )
        perturb_all(model, seed + 2)
        model.eval()
        document = sample(LENGTH, generator)
        logits, loss = run_upstream(model, upstream_aligned(document))
        model.config.speculators_config.verifier.name_or_path = "verifier"
        model.save_pretrained(case_dir / "draft")
        for extra in (case_dir / "draft").glob("*.py"):
            extra.unlink()  # upstream's auto_map copy of its own source; never read

    anchors, depths = fixed_elements()
    tensors = {
        "input_ids": document["input_ids"][None],
        "hidden_states": document["hidden_states"][None],
        "loss_mask": document["loss_mask"][None],
        "position_ids": document["position_ids"][None],
        "document_ids": torch.zeros(1, LENGTH, dtype=torch.long),
        "anchors": anchors,
        "depths": depths,
        "logits": logits.contiguous(),
        "loss": loss.detach().reshape(()),
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(case_dir / "io.safetensors"),
        metadata={"format": "pt"},
    )
    meta = {
        "made_by": "plugins/eagle3/tests/upstream/make_peagle_fixtures.py",
        "speculators": version("speculators"),
        "transformers": version("transformers"),
        "torch": version("torch"),
        "seed": seed,
        "num_depths": NUM_DEPTHS,
        "mask_token_id": MASK_TOKEN,
        "aux_layer_ids": AUX_IDS,
        "options": options,
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {case_dir}")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_peagle_fixtures.py OUTPUT_DIR")
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    for seed, (name, options) in enumerate(sorted(CASES.items())):
        make_case(root, name, options, seed=500 + 10 * seed)


if __name__ == "__main__":
    main()
