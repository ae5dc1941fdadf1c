"""Export an ``eagle`` draft to the native EAGLE-1 layout that vLLM's ``method: "eagle"`` serves.

vLLM does not load ``speculators_model_type: "eagle"`` folders (FORMAT.md 2.1: only ``eagle3``
and later types are registered), but it serves native EAGLE-1 checkpoints through
``EagleLlamaForCausalLM`` (FORMAT.md 2.8). The export writes that layout:

* ``config.json``: the Llama fields of the draft's one decoder layer (``model_type: "llama"``,
  ``architectures: ["LlamaForCausalLM"]``, which vLLM's ``EAGLEConfig`` renames to
  ``EagleLlamaForCausalLM``), ``num_hidden_layers: 1``, the verifier's ``vocab_size``,
  ``tie_word_embeddings: false``;
* ``model.safetensors``: ``fc.weight`` ``[H, 2H]`` (no bias) and ``layers.0.*`` (attention,
  MLP, ``post_attention_layernorm``; no ``input_layernorm``, which vLLM replaces by an identity
  in layer 0). No ``embed_tokens`` and no ``lm_head``: vLLM shares the verifier's.

A draft with ``fusion_bias`` or ``layernorms`` (with or without ``feature_norm_before_fc``)
computes something that layout cannot express (vLLM's ``fc`` has no bias and its layer 0 no
norms) and is refused.

Serve it with the verifier as the model::

    LLM(model=VERIFIER, speculative_config={"method": "eagle", "model": EXPORT_DIR,
                                            "num_speculative_tokens": 3})
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from speculators_core import SpeculatorsError
from speculators_core.fsutil import atomic_directory
from speculators_hass.model import EagleDraftModel

__all__ = ["VLLM_ARCHITECTURE", "export_vllm_eagle", "vllm_eagle_tensors"]

#: The architecture written to the export; vLLM's EAGLEConfig turns it into EagleLlamaForCausalLM.
VLLM_ARCHITECTURE = "LlamaForCausalLM"


def vllm_eagle_tensors(model: EagleDraftModel) -> dict[str, torch.Tensor]:
    """The draft's trained tensors under vLLM's native EAGLE-1 names (``fc.*``, ``layers.0.*``)."""
    config = model.config
    flags = ("fusion_bias", "layernorms", "feature_norm_before_fc")
    which = [f"{name}=true" for name in flags if getattr(config, name)]
    if which:
        raise SpeculatorsError(
            f"this eagle draft has {' and '.join(which)}, which vLLM's native EAGLE layout cannot "
            "express (its fc has no bias and the draft no extra norms); train the draft with "
            "fusion_bias=false and layernorms=false to serve it in vLLM"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("fusion_fc."):
            tensors["fc." + name.removeprefix("fusion_fc.")] = tensor
        elif name.startswith("transformer."):
            tensors["layers.0." + name.removeprefix("transformer.")] = tensor
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def export_vllm_eagle(
    speculator: str | os.PathLike[str] | EagleDraftModel,
    output_dir: str | os.PathLike[str],
    *,
    overwrite: bool = True,
) -> Path:
    """Write ``speculator`` (a folder in the speculators ``eagle`` format, or a loaded draft) to
    ``output_dir`` in vLLM's native EAGLE-1 layout; return ``output_dir``.

    The folder is written under a temporary name and renamed into place when complete. Raises
    :class:`~speculators_core.SpeculatorsError` for drafts with ``fusion_bias`` or
    ``layernorms``/``feature_norm_before_fc`` (see the module docstring).
    """
    if isinstance(speculator, EagleDraftModel):
        model = speculator
    else:
        path = Path(speculator)
        loaded = EagleDraftModel.from_pretrained(path)
        if not isinstance(loaded, EagleDraftModel):  # pragma: no cover - from_pretrained checks
            raise SpeculatorsError(f"'{path}' is not an eagle speculator folder")
        model = loaded
    tensors = vllm_eagle_tensors(model)
    layer = model.config.layer_config
    data = layer.to_dict()
    for key in ("transformers_version", "_name_or_path", "name_or_path", "torch_dtype"):
        data.pop(key, None)
    data.update(
        {
            "architectures": [VLLM_ARCHITECTURE],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "tie_word_embeddings": False,
            "dtype": str(tensors["fc.weight"].dtype).removeprefix("torch."),
        }
    )
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(output_dir)
