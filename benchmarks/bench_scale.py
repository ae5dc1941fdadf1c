"""Benchmark: one EAGLE-3 training step at Llama-3.1-8B draft shapes, this project vs upstream.

Every other figure in ``benchmarks/`` is at SmolLM2 shapes (hidden 576, vocabulary 49,152).
This one measures the shapes users train drafts for: a one-layer EAGLE-3 draft of
Llama-3.1-8B (hidden 4,096, MLP 14,336, 32 heads, 8 KV heads, verifier vocabulary 128,256,
draft vocabulary 32,000, 3 auxiliary states, 3 TTT steps), random weights and random hidden
states, one packed row of ``--seq-lens`` tokens per step (2,048 and 8,192 by default).

Each configuration runs in fresh processes, one side at a time, so peak memory is per side:

1. ``ours``: the EAGLE-3 plugin's ``training_step`` + backward + gradient clipping + AdamW,
   with what our ``Trainer`` does around it (``compact_frozen_parts``, on a CPU
   ``return_freed_memory_to_os``; AdamW's fused kernel is ``build_optimizer``'s default);
2. ``upstream``: upstream ``speculators==0.9.0`` (its own venv, or any Python that imports it,
   ``--upstream-python``): its ``Eagle3DraftModel.forward`` (SDPA attention and its eager KL
   loss on a CPU; its defaults on a GPU) + backward + clipping + the AdamW of its
   ``build_optimizers``, on the same batch from the same initial weights (the first losses
   must agree: the script prints both);
3. ``upstream-mmap`` (asked for with ``--sides``): upstream with our trainer's allocator setting.

``--algorithms peagle,dflash`` adds the parallel drafters: ours and upstream's P-EAGLE and
DFlash steps, upstream's on the COD elements / anchors our side drew (so both do the same work
and their first losses agree).

Reported per side: seconds per step, tokens/s, the resident memory once the model is loaded,
and the step's peak (on a CPU the process's peak resident memory, reset after loading through
``/proc/self/clear_refs`` where the kernel allows it; on a GPU ``torch.cuda.max_memory_allocated``),
and on a GPU the model FLOP utilisation (``--peak-tflops``). An analytic breakdown says what the
peak is made of: weights, gradients and AdamW's two moments of the trainable parameters, the
frozen tensors as stored, and what the step's activations add, with the logits tensors
(``rows x draft vocabulary x 4 bytes`` per TTT step) named since they grow with both row length
and vocabulary.

    .venv/bin/python benchmarks/bench_scale.py                       # 8B shapes, rows 2048 and 8192
    .venv/bin/python benchmarks/bench_scale.py --seq-lens 2048 --draft-vocabs 32000,128256
    .venv/bin/python benchmarks/bench_scale.py --tiny                # seconds: checks the steps
    python3 benchmarks/bench_scale.py --device cuda --upstream-python python3   # on a GPU

``benchmarks/gpu/check.sh`` runs it on a GPU machine (bf16 autocast, as both trainers do there),
with a two-process FSDP2 run of our trainer (``--fsdp-procs 2``) when there is more than one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UPSTREAM_PYTHON = REPO / ".cache" / "upstream-venv" / "bin" / "python"

#: Llama-3.1-8B's text model: what the draft copies (its layer is one of these).
LLAMA_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
}
#: The same structure at toy size: ``--tiny`` checks every step of the benchmark in seconds.
TINY: dict[str, Any] = {
    **LLAMA_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 8,
    "vocab_size": 1000,
}
NUM_AUX = 3
#: The side that runs upstream's step with the allocator setting our trainer makes on a CPU
#: (glibc's mmap threshold fixed, through its environment tunable): what is left of the
#: difference is the two steps', not the allocators'.
MMAP_SIDE = "upstream-mmap"
#: :data:`speculators_core.train.host_memory.MMAP_THRESHOLD` (this parent imports none of it).
MMAP_THRESHOLD = 1 << 20


# ------------------------------------------------------------------------------------------
# preparation (a child process of its own, so the parent stays small)
# ------------------------------------------------------------------------------------------


def _write_verifier(folder: Path, shape: dict[str, Any]) -> None:
    """A Llama verifier folder with only what a draft reads: config, embedding, head, norm."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        **shape,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(1)
    vocab, hidden = shape["vocab_size"], shape["hidden_size"]
    save_file(
        {
            "model.embed_tokens.weight": (
                torch.randn(vocab, hidden, generator=g) * 0.02
            ).bfloat16(),
            "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16(),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        },
        str(folder / "model.safetensors"),
    )


def _write_row(path: Path, seq_len: int, vocab: int, hidden: int, seed: int) -> None:
    """One packed row of ShareGPT-like conversations (a third to half a row each)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < seq_len:
        want = int(torch.randint(seq_len // 3, seq_len // 2 + 1, (1,), generator=g))
        lengths.append(min(want, seq_len - sum(lengths)))
    ids, masks = [], []
    for length in lengths:
        prompt = int(torch.randint(length // 8, length // 2, (1,), generator=g))
        mask = torch.zeros(length, dtype=torch.long)
        mask[prompt:] = 1
        ids.append(torch.randint(0, vocab, (length,), generator=g))
        masks.append(mask)
    states = torch.randn(seq_len, NUM_AUX + 1, hidden, generator=g).to(torch.bfloat16)
    save_file(
        {
            "input_ids": torch.cat(ids),
            "loss_mask": torch.cat(masks),
            "hidden_states": states,
            "lengths": torch.tensor(lengths),
        },
        str(path),
    )


def child_prepare(work: Path) -> dict[str, Any]:
    """Verifier folder, initial draft and the rows of every configuration, into ``work``."""
    import torch

    from speculators_core.plugins import get_host

    settings = json.loads((work / "settings.json").read_text())
    shape = settings["shape"]
    verifier = work / "verifier"
    _write_verifier(verifier, shape)
    for seq_len in settings["seq_lens"]:
        _write_row(
            work / f"row-{seq_len}.safetensors",
            seq_len,
            shape["vocab_size"],
            shape["hidden_size"],
            seed=seq_len,
        )
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(1, 1000, (shape["vocab_size"],), generator=g)
    k = settings["ttt_steps"]
    # The mask slots' token: a reserved id, as Llama 3's <|reserved_special_token_...|> (the
    # verifier folder here has no tokenizer to pick one from).
    mask = shape["vocab_size"] - 1
    # Each algorithm drafting k tokens: EAGLE-3 with k TTT steps, P-EAGLE with k depths,
    # DFlash with blocks of k + 1 (the anchor and k mask slots); the rest their defaults.
    # No noise: upstream adds it in its data pipeline, not in its model step.
    options = {
        "eagle3": {"ttt_steps": k, "noise_std": 0.0},
        "peagle": {"num_depths": k, "noise_std": 0.0, "mask_token_id": mask},
        "dflash": {"block_size": k + 1, "mask_token_id": mask},
    }
    for algorithm in settings["algorithms"]:
        model_cls = get_host().algorithm(algorithm).model_class
        for draft_vocab in settings["draft_vocabs"]:
            torch.manual_seed(0)
            draft = model_cls.from_verifier(
                verifier,
                num_layers=1,
                draft_vocab_size=None if draft_vocab >= shape["vocab_size"] else draft_vocab,
                token_counts=counts,
                **options[algorithm],
            )
            draft.save_pretrained(work / _draft_folder(algorithm, draft_vocab))
            del draft
    return {"prepared": True}


def _draft_folder(algorithm: str, draft_vocab: int) -> str:
    """The initial draft's folder name (EAGLE-3's is also what the upstream child reads)."""
    return f"draft-{draft_vocab}" if algorithm == "eagle3" else f"draft-{algorithm}-{draft_vocab}"


# ------------------------------------------------------------------------------------------
# memory readings inside a child
# ------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, if allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The measuring code shared by both sides: it is pasted into the upstream child as source, so it
# imports nothing of this project.
_MEASURE = r'''
import json, os, resource, sys, time
from pathlib import Path
import torch

def status_mb(field):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None

def reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

def peak_mb():
    hwm = status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def measure(side, model, step, batch, steps, device):
    """Run ``steps`` optimizer steps; return times, first loss and memory readings."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded_mb = status_mb("VmRSS")
    loaded_cuda = torch.cuda.memory_allocated() / 2**20 if cuda else None
    reset = reset_peak()
    times, losses = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = step(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(loss)
    return {
        "side": side,
        "times": times,
        "first_loss": losses[0],
        "loaded_rss_mb": loaded_mb,
        "peak_rss_mb": peak_mb(),
        "peak_reset": reset,
        "loaded_cuda_mb": loaded_cuda,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
'''


# ------------------------------------------------------------------------------------------
# our side
# ------------------------------------------------------------------------------------------


def _load_row(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _row_samples(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversations of a packed row written by :func:`_write_row`, as trainer samples."""
    samples, start = [], 0
    for length in row["lengths"].tolist():
        samples.append(
            {
                key: row[key][start : start + length]
                for key in ("input_ids", "loss_mask", "hidden_states")
            }
        )
        start += length
    return samples


def child_ours(
    work: Path, seq_len: int, draft_vocab: int, algorithm: str = "eagle3"
) -> dict[str, Any]:
    """The algorithm plugin's training step + backward + clip + AdamW on one packed row."""
    import torch

    from speculators_core.loading import load_speculator
    from speculators_core.train import FeatureShape, InMemorySource, Piece, collate_rows
    from speculators_core.train.arguments import TrainingArguments
    from speculators_core.train.host_memory import return_freed_memory_to_os
    from speculators_core.train.optim import build_optimizer, build_scheduler

    namespace: dict[str, Any] = {}
    exec(_MEASURE, namespace)  # the same measuring code the upstream child runs
    settings = json.loads((work / "settings.json").read_text())
    device = torch.device(settings["device"])
    cuda = device.type == "cuda"
    if not cuda:
        return_freed_memory_to_os()  # what our Trainer does on a CPU
    model: Any = load_speculator(
        work / _draft_folder(algorithm, draft_vocab), verifier=work / "verifier"
    )
    # Training-only settings are not saved with a checkpoint. No noise: upstream adds it in its
    # data pipeline, not in its model step.
    implementation = "auto" if cuda else "sdpa"
    if algorithm == "eagle3":
        model.configure_training(
            ttt_steps=settings["ttt_steps"], noise_std=0.0, attn_implementation=implementation
        )
    elif algorithm == "peagle":
        model.configure_training(
            num_depths=settings["ttt_steps"], noise_std=0.0, attn_implementation=implementation
        )
    else:
        model.configure_training(noise_std=0.0, attn_implementation=implementation)
    model.compact_frozen_parts()  # what our Trainer does (without FSDP)
    model.to(device)
    model.train()
    row = _load_row(work / f"row-{seq_len}.safetensors")
    samples = _row_samples(row)
    source = InMemorySource(samples)
    feature = FeatureShape(NUM_AUX + 1, settings["shape"]["hidden_size"], torch.bfloat16)
    pieces = [Piece(i, 0, len(s["input_ids"])) for i, s in enumerate(samples)]
    batch = collate_rows([pieces], source, seq_len, feature)
    batch = {k: v.to(device) for k, v in batch.items()}
    del row, samples, source
    if algorithm != "eagle3":
        torch.manual_seed(0)
        elements = work / f"elements-{algorithm}-{seq_len}-{draft_vocab}.safetensors"
        _fix_elements(elements, algorithm, model, batch)
    args = TrainingArguments(learning_rate=1e-4, weight_decay=0.01)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args, 100)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(b: dict[str, Any]) -> float:
        if cuda:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                out = model.training_step(b)
        else:
            out = model.training_step(b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    side = "ours" if algorithm == "eagle3" else f"ours/{algorithm}"
    result = namespace["measure"](side, model, step, batch, settings["steps"], device)
    result["trainable_params"] = sum(p.numel() for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    result["frozen_params"] = sum(p.numel() for p in frozen)
    result["frozen_bytes"] = sum(p.numel() * p.element_size() for p in frozen)
    return result


def _fix_elements(path: Path, algorithm: str, model: Any, batch: dict[str, Any]) -> None:
    """Our sampler's draw (P-EAGLE's COD elements, DFlash's anchors) for the one-row ``batch``,
    reused at every step and written to ``path``, where upstream's side reads it: both train
    on the same elements. Only elements both score the same way are kept: P-EAGLE's whose
    target lies in the anchor's document (upstream scores across documents, ours does not),
    with their indices in upstream's rows as well (``upstream_anchors``); DFlash's anchors
    outside a row's last block (upstream would index past the row)."""
    from safetensors.torch import save_file

    if algorithm == "peagle":
        import speculators_eagle3.peagle as peagle
        from speculators_eagle3.alignment import align_batch

        keys = ("input_ids", "hidden_states", "loss_mask", "position_ids", "document_ids")
        aligned = align_batch(*(batch[k] for k in keys))
        docs = aligned.document_ids[0]
        length = int((docs >= 0).nonzero().max()) + 1  # the model trims the padding after it
        docs = docs[:length]
        anchors, depths = peagle.cod_sample(
            aligned.loss_mask[0, :length].bool() & (docs >= 0),
            num_depths=model.num_depths,
            ratio=model.down_sample_ratio,
            ratio_min=model.down_sample_ratio_min,
            max_anchors=model.max_anchors,
        )
        target = anchors + depths
        keep = (
            (docs[anchors] >= 0)  # not a document's last index (no next token to score)
            & (target < length)
            & (docs[target.clamp(max=length - 1)] == docs[anchors])
        )
        anchors, depths = anchors[keep], depths[keep]
        # Upstream's rows lose each document's last index (its shift_batch drops it), so an
        # index moves left by the number of documents before it.
        dropped = (docs < 0).long().cumsum(0)
        elements = {
            "anchors": anchors,
            "depths": depths,
            "upstream_anchors": anchors - dropped[anchors],
        }
        peagle.cod_sample = lambda *_a, **_k: (elements["anchors"], elements["depths"])
    elif algorithm == "dflash":
        from speculators_dflash.model import DFlashDraftModel

        choose = DFlashDraftModel.choose_anchors
        elements = {}

        def fixed_anchors(self: Any, loss_mask: Any, *args: Any) -> Any:
            if not elements:
                anchors = choose(self, loss_mask, *args)
                elements["anchors"] = anchors[anchors < loss_mask.shape[0] - self.config.block_size]
                save_file({"anchors": elements["anchors"].cpu().contiguous()}, str(path))
            return elements["anchors"]

        DFlashDraftModel.choose_anchors = fixed_anchors
        return
    save_file({k: v.detach().cpu().contiguous() for k, v in elements.items()}, str(path))


def child_fsdp(work: Path, seq_len: int, draft_vocab: int) -> dict[str, Any]:
    """Our Trainer under torchrun (FSDP2 when there are several processes): tokens/s per step."""
    import torch

    from speculators_core.loading import load_speculator
    from speculators_core.train import InMemorySource, Trainer, TrainerCallback, TrainingArguments

    settings = json.loads((work / "settings.json").read_text())
    cuda = settings["device"] == "cuda"
    model: Any = load_speculator(work / f"draft-{draft_vocab}", verifier=work / "verifier")
    model.configure_training(
        ttt_steps=settings["ttt_steps"],
        noise_std=0.0,
        attn_implementation="auto" if cuda else "sdpa",
    )
    row = _load_row(work / f"row-{seq_len}.safetensors")
    samples = _row_samples(row)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Every rank gets whole rows: the samples repeat so that each step has one row per rank.
    source = InMemorySource(samples * (world * (settings["steps"] + 1)))
    args = TrainingArguments(
        output_dir=str(work / f"fsdp-run-{seq_len}-{draft_vocab}"),
        num_epochs=1,
        max_steps=settings["steps"] + 1,
        seq_len=seq_len,
        val_fraction=0.0,
        log_every=1,
        save_per_epoch=False,
        progress=False,
        console_log=False,
        jsonl_log=False,
        device=None if cuda else "cpu",
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    timer = Timer()
    trainer = Trainer(model, args, source, callbacks=[timer])
    trainer.train()
    return {
        "side": f"ours/trainer x{world}",
        "times": timer.times[1:],  # the first step warms up
        "world_size": world,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_rss_mb": _peak_mb(),
    }


# ------------------------------------------------------------------------------------------
# upstream's side (runs in a Python that has upstream speculators, never speculators_core)
# ------------------------------------------------------------------------------------------

UPSTREAM_CHILD = (
    _MEASURE
    + r"""
from types import SimpleNamespace
from safetensors.torch import load_file
from speculators import SpeculatorModel, SpeculatorModelConfig
from speculators.losses.eager import ce_loss, kl_div_loss
from speculators.models.eagle3.data import shift_batch
from speculators.train.optimizers import build_optimizers
from transformers import get_linear_schedule_with_warmup

work, seq_len, draft_vocab = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
algorithm = sys.argv[4] if len(sys.argv) > 4 else "eagle3"
settings = json.loads((work / "settings.json").read_text())
device = torch.device(settings["device"])
cuda = device.type == "cuda"
folder = str(work / (f"draft-{draft_vocab}" if algorithm == "eagle3" else f"draft-{algorithm}-{draft_vocab}"))
config = SpeculatorModelConfig.from_pretrained(folder)
if not cuda:
    config.transformer_layer_config._attn_implementation = "sdpa"  # no flex attention on a CPU
model = SpeculatorModel.from_pretrained(folder, config=config).to(device)
model.train()
row = load_file(str(work / f"row-{seq_len}.safetensors"))
parts, start = [], 0
for length in row["lengths"].tolist():
    hs = row["hidden_states"][start : start + length].float()
    part = {
        "input_ids": row["input_ids"][start : start + length],
        "hidden_states": hs[:, :-1].flatten(1),
        "verifier_last_hidden_states": hs[:, -1],
        "loss_mask": row["loss_mask"][start : start + length],
        "lengths": torch.tensor([length]),
        "position_ids": torch.arange(length),
    }
    parts.append(part if algorithm == "dflash" else shift_batch(part))  # DFlash aligns itself
    start += length
batch = {}
for key in ("input_ids", "hidden_states", "verifier_last_hidden_states", "loss_mask", "position_ids"):
    cat = torch.cat([p[key] for p in parts])
    pad = torch.zeros((seq_len - cat.shape[0], *cat.shape[1:]), dtype=cat.dtype)
    batch[key] = torch.cat([cat, pad])[None].to(device)
lengths = torch.cat([p["lengths"] for p in parts])
doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
batch["document_ids"] = torch.cat([doc, -torch.ones(seq_len - doc.shape[0], dtype=torch.long)])[None].to(device)
del row, parts
optimizers = build_optimizers(model, SimpleNamespace(optimizer="adamw", lr=1e-4, weight_decay=0.01))
schedulers = [get_linear_schedule_with_warmup(o, num_warmup_steps=1, num_training_steps=100) for o in optimizers]
# On a CPU the eager KL loss (the default fused one needs Triton); on a GPU upstream's default.
loss_config = None if cuda else {"kl_div": (kl_div_loss, 1.0)}
# The parallel drafters train on the elements our side sampled (the same work, the same loss).
if algorithm == "eagle3":
    extra = {"ttt_steps": settings["ttt_steps"]}
else:
    elements = load_file(str(work / f"elements-{algorithm}-{seq_len}-{draft_vocab}.safetensors"))
    elements = {k: v.to(device) for k, v in elements.items()}
if algorithm == "peagle":
    import speculators.models.peagle.core as peagle_core
    peagle_core.generate_cod_sample_indices = lambda **_k: (elements["upstream_anchors"], elements["depths"])
    extra = {"num_depths": settings["ttt_steps"]}
if algorithm == "dflash":
    import speculators.models.dflash.core as dflash_core
    anchors = elements["anchors"]
    dflash_core.select_anchors = lambda *_a, **_k: (anchors, torch.ones_like(anchors, dtype=torch.bool))
    extra = {"per_position_loss_weight": "dpace", "dpace_alpha": 0.5, "max_anchors": anchors.numel()}
    loss_config = {"ce": (ce_loss, 1.0)}

def step(b):
    for o in optimizers:
        o.zero_grad()
    if cuda:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            _tokens, loss, _metrics = model(**b, loss_config=loss_config, **extra)
    else:
        _tokens, loss, _metrics = model(**b, loss_config=loss_config, **extra)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for o in optimizers:
        o.step()
    for s in schedulers:
        s.step()
    return float(loss)

side = "upstream" if algorithm == "eagle3" else f"upstream/{algorithm}"
result = measure(side, model, step, batch, settings["steps"], device)
result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
frozen = [p for p in model.parameters() if not p.requires_grad]
result["frozen_params"] = sum(p.numel() for p in frozen)
result["frozen_bytes"] = sum(p.numel() * p.element_size() for p in frozen)
print(json.dumps(result))
"""
)


# ------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------


def _run(
    command: list[str], label: str, env_extra: dict[str, str] | None = None
) -> dict[str, Any] | None:
    print(f"running {label} ...", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    env.setdefault("TQDM_DISABLE", "1")
    env.update(env_extra or {})
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        print(f"{label} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        print(f"{label} printed no result:\n{proc.stdout[-2000:]}", file=sys.stderr)
        return None
    got = json.loads(lines[-1])
    print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return got


def step_flops(shape: dict[str, Any], seq_len: int, draft_vocab: int, ttt_steps: int) -> float:
    """Model FLOPs of one training step (forward + backward of the matmuls; attention causal).

    Per TTT step the layer attends to every earlier step's keys as well (the cache grows by one
    row length per step). The target logits (verifier head over the draft vocabulary) are a
    forward only; ``fc`` runs once.
    """
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = h // heads
    layer = 2 * h * (heads * head_dim + 2 * kv * head_dim) + heads * head_dim * h + 3 * h * inter
    per_token_step = layer + h * draft_vocab
    forward = 2 * seq_len * (NUM_AUX * h * h + ttt_steps * per_token_step)
    attention = sum(2 * 2 * seq_len * (seq_len * (j + 0.5)) * h for j in range(ttt_steps))
    return 3 * (forward + attention) + 2 * seq_len * h * draft_vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="2048,8192", help="row lengths (one row per step)")
    parser.add_argument("--draft-vocabs", default="32000", help="draft vocabulary sizes")
    parser.add_argument("--ttt-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per side")
    parser.add_argument(
        "--sides",
        default="ours,upstream",
        help=f"ours, upstream, and {MMAP_SIDE} (upstream with our trainer's allocator setting)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes: check the steps fast")
    parser.add_argument(
        "--fsdp-procs",
        type=int,
        default=0,
        help="also run our trainer under torchrun with N processes",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU"
    )
    parser.add_argument("--upstream-python", default=str(DEFAULT_UPSTREAM_PYTHON))
    parser.add_argument("--work", default=None, help="keep the work files here")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--algorithms",
        default="eagle3",
        help="eagle3, and the parallel drafters peagle and dflash (upstream's step runs on the "
        "elements ours drew: the same work and loss)",
    )
    opts = parser.parse_args()

    if opts.child:
        work = Path(opts.work)
        extra = [int(x) for x in opts.child_args.split(",") if x]
        if opts.child == "prepare":
            result = child_prepare(work)
        elif opts.child == "ours":
            result = child_ours(work, extra[0], extra[1], algorithm=opts.algorithms)
        else:
            result = child_fsdp(work, *extra)
            if int(os.environ.get("RANK", "0")) != 0:
                return
        print(json.dumps(result))
        return

    shape = TINY if opts.tiny else LLAMA_8B
    seq_lens = [int(x) for x in opts.seq_lens.split(",")] if not opts.tiny else [64, 128]
    draft_vocabs = [int(x) for x in opts.draft_vocabs.split(",")] if not opts.tiny else [256]
    sides = [s.strip() for s in opts.sides.split(",") if s.strip()]
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _run_all(opts, shape, seq_lens, draft_vocabs, sides, work)
    finally:
        if not opts.work:  # drafts at 8B shapes take gigabytes each
            shutil.rmtree(work, ignore_errors=True)


def _run_all(
    opts: argparse.Namespace,
    shape: dict[str, Any],
    seq_lens: list[int],
    draft_vocabs: list[int],
    sides: list[str],
    work: Path,
) -> None:
    """Prepare, run every configuration and side, report."""
    settings = {
        "shape": shape,
        "seq_lens": seq_lens,
        "draft_vocabs": draft_vocabs,
        "ttt_steps": opts.ttt_steps,
        "steps": opts.steps,
        "device": opts.device,
        "algorithms": [a.strip() for a in opts.algorithms.split(",") if a.strip()],
    }
    (work / "settings.json").write_text(json.dumps(settings))
    me = [sys.executable, str(Path(__file__).resolve())]
    if _run([*me, "--child", "prepare", "--work", str(work)], "preparation") is None:
        raise SystemExit(1)
    upstream = Path(opts.upstream_python)
    if "upstream" in sides and not (upstream.exists() or opts.upstream_python.count("/") == 0):
        print(
            f"upstream Python not found at {upstream}; make its venv with "
            "plugins/eagle3/tests/upstream/setup_upstream_venv.sh, or pass --upstream-python",
            file=sys.stderr,
        )
        sides.remove("upstream")

    results: list[dict[str, Any]] = []
    for draft_vocab in draft_vocabs:
        for seq_len in seq_lens:
            for side in sides if "eagle3" in settings["algorithms"] else []:
                label = f"{side}: rows of {seq_len}, draft vocab {draft_vocab}"
                if side == "ours":
                    command = [
                        *me,
                        "--child",
                        "ours",
                        "--work",
                        str(work),
                        "--child-args",
                        f"{seq_len},{draft_vocab}",
                    ]
                else:  # upstream, or upstream-mmap: the allocator setting our trainer makes
                    command = [
                        opts.upstream_python,
                        "-c",
                        UPSTREAM_CHILD,
                        str(work),
                        str(seq_len),
                        str(draft_vocab),
                    ]
                env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if side == MMAP_SIDE else None
                got = _run(command, label, env)
                if got:
                    got.update(seq_len=seq_len, draft_vocab=draft_vocab, side=side)
                    results.append(got)
            for algorithm in settings["algorithms"]:
                if algorithm == "eagle3":
                    continue
                command = [*me, "--child", "ours", "--work", str(work), "--algorithms", algorithm,
                           "--child-args", f"{seq_len},{draft_vocab}"]  # fmt: skip
                got = _run(
                    command, f"ours/{algorithm}: rows of {seq_len}, draft vocab {draft_vocab}"
                )
                if got:
                    got.update(seq_len=seq_len, draft_vocab=draft_vocab)
                    results.append(got)
                if got and "upstream" in sides:  # upstream's step on the elements ours drew
                    command = [opts.upstream_python, "-c", UPSTREAM_CHILD, str(work),
                               str(seq_len), str(draft_vocab), algorithm]  # fmt: skip
                    label = f"upstream/{algorithm}: rows of {seq_len}, draft vocab {draft_vocab}"
                    got = _run(command, label)
                    if got:
                        got.update(seq_len=seq_len, draft_vocab=draft_vocab)
                        results.append(got)
            if opts.fsdp_procs > 1:
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc-per-node={opts.fsdp_procs}",
                    str(Path(__file__).resolve()),
                    "--child",
                    "fsdp",
                    "--work",
                    str(work),
                    "--child-args",
                    f"{seq_len},{draft_vocab}",
                ]
                got = _run(command, f"our trainer, FSDP2 x{opts.fsdp_procs}: rows of {seq_len}")
                if got:
                    got.update(seq_len=seq_len, draft_vocab=draft_vocab)
                    results.append(got)
    report(results, settings, opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"settings": settings, "results": results}, indent=1))


def report(
    results: list[dict[str, Any]], settings: dict[str, Any], opts: argparse.Namespace
) -> None:
    """Print the table, the ratios to upstream and the memory breakdown."""
    import torch

    shape = settings["shape"]
    cuda = settings["device"] == "cuda"
    print()
    load = os.getloadavg()[0]
    print(
        f"{', '.join(settings['algorithms'])} draft(s), "
        f"{'toy shapes (--tiny)' if opts.tiny else 'Llama-3.1-8B shapes'}: hidden "
        f"{shape['hidden_size']}, MLP {shape['intermediate_size']}, heads {shape['num_attention_heads']}/"
        f"{shape['num_key_value_heads']}, verifier vocab {shape['vocab_size']}, {NUM_AUX} aux states, "
        f"1 layer, TTT {settings['ttt_steps']}, one packed row per step, "
        f"{'bf16 autocast on ' + torch.cuda.get_device_name() if cuda else f'float32 on the CPU, {torch.get_num_threads()} threads'}; "
        f"{settings['steps']} timed step(s) per side; load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    mem = "peak GPU MB" if cuda else "peak RSS MB"
    header = f"{'side':<20}{'rows':>6}{'draft V':>9}{'s/step':>9}{'tokens/s':>10}{'loaded MB':>11}{mem:>13}{'first loss':>12}"
    if cuda:
        header += f"{'MFU':>7}"
    print(header)
    by_key: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in results:
        seconds = min(r["times"]) if r["times"] else float("nan")
        tokens = r["seq_len"] * r.get("world_size", 1)
        peak = r["peak_cuda_mb"] if cuda else r["peak_rss_mb"]
        loaded = r.get("loaded_cuda_mb") if cuda else r.get("loaded_rss_mb")
        line = (
            f"{r['side']:<20}{r['seq_len']:>6}{r['draft_vocab']:>9}{seconds:>9.2f}{tokens / seconds:>10.1f}"
            f"{(loaded or float('nan')):>11.0f}{peak:>13.0f}{r.get('first_loss', float('nan')):>12.4f}"
        )
        if cuda:
            if r["side"].startswith("ours/") and "x" not in r["side"]:
                line += f"{'-':>7}"  # the FLOP count below is EAGLE-3's
            else:
                flops = step_flops(shape, r["seq_len"], r["draft_vocab"], settings["ttt_steps"])
                line += f"{flops / seconds / (opts.peak_tflops * 1e12):>7.1%}"
        print(line)
        by_key[(r["side"], r["seq_len"], r["draft_vocab"])] = r | {
            "seconds": seconds,
            "peak": peak,
            "loaded": loaded,
        }
    if not any(r.get("peak_reset", True) for r in results):
        print("note: the kernel refused a peak reset; peaks include loading")

    print()
    for (side, seq_len, vocab), ours in sorted(by_key.items()):
        if not side.startswith("ours") or " x" in side:
            continue
        algorithm = side.removeprefix("ours")  # "" or "/peagle", "/dflash"
        for other in (f"upstream{algorithm}", f"{MMAP_SIDE}{algorithm}"):
            up = by_key.get((other, seq_len, vocab))
            if not up:
                continue
            agree = abs(ours["first_loss"] - up["first_loss"]) <= 1e-3 * max(
                1.0, abs(up["first_loss"])
            )
            print(
                f"rows {seq_len}, draft vocab {vocab}: {side} / {other} peak memory "
                f"{ours['peak'] / up['peak']:.2f}x (goal <= 0.70x), step time {ours['seconds'] / up['seconds']:.2f}x; "
                f"first losses {ours['first_loss']:.4f} vs {up['first_loss']:.4f} "
                f"({'identical' if agree else 'DIFFERENT: not the same configuration'})"
            )

    # What the peak is made of, from the parameter counts (4-byte fp32 master weights).
    for (side, seq_len, vocab), r in sorted(by_key.items()):
        if "trainable_params" not in r:
            continue
        trainable, frozen = r["trainable_params"], r["frozen_params"]
        frozen_bytes = r.get("frozen_bytes", frozen * 4)
        # fp32 weights, gradients and two AdamW moments of what trains; what is frozen as stored.
        states = (trainable * 4 * 4 + frozen_bytes) / 2**20
        logits = seq_len * vocab * 4 / 2**20
        activations = r["peak"] - states
        print(
            f"{side} rows {seq_len}, draft vocab {vocab}: weights+grads+AdamW {states:,.0f} MB "
            f"({trainable / 1e6:,.0f}M trainable, {frozen / 1e6:,.0f}M frozen in "
            f"{frozen_bytes / 2**20:,.0f} MB); above them at the peak ~{activations:,.0f} MB "
            f"(activations, temporaries, the runtime); one fp32 logits tensor "
            f"[rows x draft vocab] = {logits:,.0f} MB"
        )
    print(
        "goal (stated, not asserted): peak memory <= 0.7x upstream's at the same shapes, identical loss"
    )


if __name__ == "__main__":
    main()
