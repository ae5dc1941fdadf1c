"""Write the upstream-made EAGLE-3 fixtures (run in the upstream venv, not the project's).

    <upstream-venv>/bin/python plugins/eagle3/tests/upstream/make_fixtures.py \
        plugins/eagle3/tests/upstream/fixtures

For each case below this builds a tiny random verifier, builds a draft exactly the way
upstream's trainer does (``create_transformer_layer_config`` + ``Eagle3DraftModel.
from_training_args``, vocabulary mapping from upstream's own ``build_vocab_mappings_from_
distribution``), perturbs every draft weight so that no norm or head is at its initial value,
saves it with upstream's ``save_pretrained``, and runs upstream's forward on fixed inputs:

* ``packed``: two documents and padding packed in one row, already aligned by upstream's
  ``shift_batch`` (what upstream's forward consumes); the per-step logits are captured.
* ``single``: one document, unaligned (what the project's ``training_step`` consumes), with
  upstream's loss and metrics computed on its ``shift_batch`` alignment (eager forward KL).

Each case folder holds ``draft/`` (upstream's checkpoint; the Python file upstream copies next
to its config for ``auto_map`` is removed, the project never reads it), ``verifier/`` (the
verifier's config and the three tensors a draft needs: embedding, final norm, LM head),
``io.safetensors`` (inputs and upstream outputs) and ``meta.json``. All seeds are fixed, so
re-running reproduces the files.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from speculators.losses.eager import kl_div_loss
from speculators.models.eagle3 import Eagle3DraftModel, shift_batch
from speculators.train.cli import create_transformer_layer_config
from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
HIDDEN = 32
VERIFIER_LAYERS = 4
AUX_IDS = [1, 2, 3]
TTT_STEPS = 3
DOC_LENGTHS = (14, 10)  # unaligned lengths of the two packed documents
PAD = 2

CASES = {
    "llama_draft_vocab": {
        "verifier_type": "llama",
        "draft_arch": "llama",
        "num_layers": 1,
        "draft_vocab_size": 48,
        "norm_before_residual": True,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
    },
    "qwen3_two_layers_norm_before_fc": {
        "verifier_type": "qwen3",
        "draft_arch": "qwen3",
        "num_layers": 2,
        "draft_vocab_size": VOCAB,
        "norm_before_residual": False,
        "norm_before_fc": True,
        "fc_norm": False,
        "norm_output": True,
    },
    "llama_fc_norm": {
        "verifier_type": "llama",
        "draft_arch": "llama",
        "num_layers": 1,
        "draft_vocab_size": 40,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": True,
        "norm_output": False,
    },
}


def make_verifier(folder: Path, model_type: str, seed: int) -> None:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=VERIFIER_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM" if model_type == "llama" else "Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)


def verifier_subset(full: Path, out: Path) -> None:
    """The verifier's config and the three tensors a draft reads from it."""
    from safetensors import safe_open

    out.mkdir(parents=True)
    shutil.copy(full / "config.json", out / "config.json")
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    with safe_open(str(full / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name).contiguous() for name in names}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("verifier_") or name == "embed_tokens.weight":
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight") or ".fc_norm." in name or name.startswith("fc_norm"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def sample(length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One unaligned document: tokens, 3 aux states + final state, mask (prompt = first 4)."""
    mask = torch.ones(length, dtype=torch.long)
    mask[: min(4, length // 3)] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (length,), generator=generator),
        "hidden_states": torch.randn(length, len(AUX_IDS) + 1, HIDDEN, generator=generator),
        "loss_mask": mask,
        "position_ids": torch.arange(length),
    }


def upstream_aligned(doc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shifted = shift_batch(
        {
            "input_ids": doc["input_ids"],
            "hidden_states": doc["hidden_states"][:, :-1].flatten(1),
            "verifier_last_hidden_states": doc["hidden_states"][:, -1],
            "loss_mask": doc["loss_mask"],
            "lengths": torch.tensor([doc["input_ids"].shape[0]]),
            "position_ids": doc["position_ids"],
        }
    )
    return shifted


def run_upstream(
    model: Eagle3DraftModel, aligned: dict[str, torch.Tensor], docs: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Upstream's forward on aligned ``[T]`` tensors: per-step logits, loss and metrics."""
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            _tokens, loss, metrics = model(
                hidden_states=aligned["hidden_states"][None],
                input_ids=aligned["input_ids"][None],
                document_ids=docs[None],
                loss_mask=aligned["loss_mask"][None],
                position_ids=aligned["position_ids"][None],
                verifier_last_hidden_states=aligned["verifier_last_hidden_states"][None],
                ttt_steps=TTT_STEPS,
                ttt_step_loss_decay=1.0,
                loss_config={"kl_div": (kl_div_loss, 1.0)},  # eager: the fused one needs Triton
            )
    finally:
        hook.remove()
    return captured, loss, metrics


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
        layer_config = create_transformer_layer_config(
            verifier_name_or_path=str(verifier),
            num_layers=options["num_layers"],
            draft_arch=options["draft_arch"],
            hidden_act=None,
            sliding_window=4096,
            full_attention_indices=list(range(options["num_layers"])),
        )
        model = Eagle3DraftModel.from_training_args(
            verifier_config=layer_config,
            t2d=t2d,
            d2t=d2t,
            verifier_name_or_path=str(verifier),
            target_layer_ids=AUX_IDS,
            draft_vocab_size=options["draft_vocab_size"],
            norm_before_residual=options["norm_before_residual"],
            norm_before_fc=options["norm_before_fc"],
            fc_norm=options["fc_norm"],
            norm_output=options["norm_output"],
            ttt_steps=TTT_STEPS,
            draft_attn_impl="sdpa",  # flex attention has no CPU backward; sdpa is exact here
        )
        perturb(model, seed + 2)
        model.eval()

        # Packed row: two documents aligned by upstream, then padding (document id -1).
        parts = [upstream_aligned(sample(n, generator)) for n in DOC_LENGTHS]
        packed = {
            key: torch.cat([p[key] for p in parts])
            for key in (
                "input_ids",
                "hidden_states",
                "verifier_last_hidden_states",
                "loss_mask",
                "position_ids",
            )
        }
        docs = torch.cat([torch.full((p["input_ids"].shape[0],), i) for i, p in enumerate(parts)])
        packed = {
            "input_ids": torch.cat([packed["input_ids"], torch.zeros(PAD, dtype=torch.long)]),
            "hidden_states": torch.cat([packed["hidden_states"], torch.zeros(PAD, 3 * HIDDEN)]),
            "verifier_last_hidden_states": torch.cat(
                [packed["verifier_last_hidden_states"], torch.zeros(PAD, HIDDEN)]
            ),
            "loss_mask": torch.cat([packed["loss_mask"], torch.zeros(PAD, dtype=torch.long)]),
            "position_ids": torch.cat([packed["position_ids"], torch.zeros(PAD, dtype=torch.long)]),
        }
        docs = torch.cat([docs, torch.full((PAD,), -1)])
        packed_logits, _, _ = run_upstream(model, packed, docs)

        # Single document: store it unaligned, score it as upstream aligns it.
        single = sample(DOC_LENGTHS[0], generator)
        single_aligned = upstream_aligned(single)
        _, single_loss, single_metrics = run_upstream(
            model, single_aligned, torch.zeros(DOC_LENGTHS[0] - 1, dtype=torch.long)
        )

        # Record a stable verifier name instead of the temporary path.
        model.config.speculators_config.verifier.name_or_path = "verifier"
        model.save_pretrained(case_dir / "draft")
        for extra in (case_dir / "draft").glob("*.py"):
            extra.unlink()  # upstream's auto_map copy of its own source; never read

    tensors: dict[str, torch.Tensor] = {
        "packed.input_ids": packed["input_ids"][None],
        "packed.aux_hidden_states": packed["hidden_states"][None],
        "packed.document_ids": docs[None],
        "packed.position_ids": packed["position_ids"][None],
        "single.input_ids": single["input_ids"][None],
        "single.hidden_states": single["hidden_states"][None],
        "single.loss_mask": single["loss_mask"][None],
        "single.position_ids": single["position_ids"][None],
        "single.document_ids": torch.zeros(1, DOC_LENGTHS[0], dtype=torch.long),
        "single.loss": single_loss.detach().reshape(()),
    }
    for step, logits in enumerate(packed_logits):
        tensors[f"packed.logits_{step}"] = logits.contiguous()
    for step in range(TTT_STEPS):
        tensors[f"single.loss_{step}"] = single_metrics[f"loss_{step}_sum"].reshape(())
        for kind in ("full_acc", "cond_acc"):
            ratio = single_metrics[f"{kind}_{step}_sum"] / single_metrics[f"{kind}_{step}_total"]
            tensors[f"single.{kind}_{step}"] = ratio.reshape(())
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(case_dir / "io.safetensors"),
        metadata={"format": "pt"},
    )
    meta = {
        "made_by": "plugins/eagle3/tests/upstream/make_fixtures.py",
        "speculators": version("speculators"),
        "transformers": version("transformers"),
        "torch": version("torch"),
        "seed": seed,
        "ttt_steps": TTT_STEPS,
        "aux_layer_ids": AUX_IDS,
        "doc_lengths": list(DOC_LENGTHS),
        "padding": PAD,
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
        make_case(root, name, options, seed=100 + 10 * seed)


if __name__ == "__main__":
    main()
