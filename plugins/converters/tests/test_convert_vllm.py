"""Converted SmolLM2-sized drafts load and speculate in a real vLLM 0.32 for CPU.

A SafeAILab EAGLE-3 checkpoint (reduced draft vocabulary, so vLLM must apply ``d2t``) and a
SafeAILab EAGLE-1 checkpoint, both sized for SmolLM2-135M-Instruct with random weights, are
converted (with validation); the EAGLE-3 folder is served as it is, the EAGLE-1 one through
the native EAGLE layout export of speculators-hass (vLLM does not read ``eagle`` folders,
FORMAT.md 2.8); a z-lab DFlash checkpoint (one layer, fused ``qkv_proj``) is served as
``method: dflash`` from its converted folder. One vLLM worker runs the verifier alone and then with each draft: greedy output
must be identical and vLLM must have drafted. Random drafts are rarely accepted; acceptance is
not the point here, loading is.
"""

from __future__ import annotations

from typing import Any

import pytest
from _support import chat_prompts
from converter_helpers import make_safeailab_eagle, make_safeailab_eagle3, make_zlab_dflash

from speculators_core import PluginHost, get_host
from speculators_core.conversion import run_conversion
from speculators_core.evaluate.vllm_env import vllm_available
from speculators_core.evaluate.vllm_runner import VllmJob, run_vllm_jobs

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
]

K = 2
NEW_TOKENS = 16
QUESTIONS = ["What is the capital of France?", "Name three colours."]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from speculators_hass import export_vllm_eagle
    from transformers import AutoTokenizer

    from speculators_core.assets import MissingPackageError, smollm2_path

    try:
        verifier = smollm2_path()
    except MissingPackageError as err:
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("convert-vllm")
    converters = get_host().converters()
    make_safeailab_eagle3(folder / "eagle3-src", verifier, draft_vocab=4096, kind="bin")
    run_conversion(
        converters["safeailab-eagle3"],
        folder / "eagle3-src",
        verifier=verifier,
        output=folder / "eagle3",
        validate=True,
        options={"eagle_aux_hidden_state_layer_ids": [2, 15, 27], "speculative_tokens": K},
    )
    make_safeailab_eagle(folder / "eagle1-src", verifier, kind="safetensors-sharded")
    run_conversion(
        converters["safeailab-eagle"],
        folder / "eagle1-src",
        verifier=verifier,
        output=folder / "eagle1",
        validate=True,
    )
    exported = export_vllm_eagle(folder / "eagle1", folder / "eagle1-vllm")
    make_zlab_dflash(
        folder / "dflash-src",
        verifier,
        target_layer_ids=(1, 14, 26),
        num_layers=1,
        block_size=K + 1,
        fused_qkv=True,
    )
    run_conversion(
        converters["zlab-dflash"],
        folder / "dflash-src",
        verifier=verifier,
        output=folder / "dflash",
        validate=True,
    )

    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = chat_prompts(tokenizer, QUESTIONS)
    common: dict[str, Any] = {
        "prompts": prompts,
        "k": K,
        "max_new_tokens": NEW_TOKENS,
        "max_model_len": 256,
        "host": PluginHost(),  # the eagle3 record says how vLLM serves the converted folder
    }
    baseline, eagle3, eagle1, dflash = run_vllm_jobs(
        [
            VllmJob(verifier=verifier, draft=None, **common),
            VllmJob(verifier=verifier, draft=folder / "eagle3", **common),
            VllmJob(verifier=verifier, draft=exported, method="eagle", **common),
            VllmJob(verifier=verifier, draft=folder / "dflash", **common),
        ]
    )
    return {"baseline": baseline, "eagle3": eagle3, "eagle1": eagle1, "dflash": dflash}


@pytest.mark.parametrize("draft", ["eagle3", "eagle1", "dflash"])
def test_converted_draft_is_served_by_vllm(run: dict[str, Any], draft: str) -> None:
    baseline, speculative = run["baseline"], run[draft]
    assert all(len(o) > 0 for o in baseline.outputs)
    assert speculative.outputs == baseline.outputs  # greedy speculative decoding is lossless
    assert speculative.num_drafts > 0
    assert speculative.num_draft_tokens == K * speculative.num_drafts
