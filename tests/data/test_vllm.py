"""The vLLM backends on the real SmolLM2: extract_hidden_states capture and regeneration.

vLLM spawns its engine processes, so the run happens in a child script with a ``__main__``
guard; one child starts both engines (about a minute each on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datatest_support import CHATS, write_jsonl

from speculators_core.data.prepared import prepare_data
from speculators_core.data.store import ShardStore, capture_to_store
from speculators_core.data.vllm_backend import vllm_available
from speculators_core.features import HiddenStateSpec

SPEC = HiddenStateSpec((2, 15, 27, 30))

CHILD = textwrap.dedent(
    """
    import json, sys
    from speculators_core.data.store import capture_to_store
    from speculators_core.data.regenerate import GenerationSettings, regenerate_data
    from speculators_core.features import HiddenStateSpec

    if __name__ == "__main__":
        verifier, prepared, store, questions, regen = sys.argv[1:6]
        capture_to_store(verifier=verifier, prepared=prepared, output=store, backend="vllm",
                         spec=HiddenStateSpec((2, 15, 27, 30)), batch_size=4)
        regenerate_data(verifier=verifier, sources=[questions], output=regen, backend="vllm",
                        settings=GenerationSettings(max_new_tokens=12), seq_length=256)
    """
)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_vllm_backends_match_transformers(smollm2: Path, tmp_path: Path):
    """vLLM's captured states equal the transformers backend's; its greedy answer is the same."""
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    prepared = tmp_path / "prep"
    prepare_data(verifier=smollm2, sources=[data], output=prepared, seed=None)
    questions = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "?"},
                ]
            }
        ],
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    vllm_store, regen = tmp_path / "hs-vllm", tmp_path / "regen"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(smollm2),
            str(prepared),
            str(vllm_store),
            str(questions),
            str(regen),
        ],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    hf_store = tmp_path / "hs-hf"
    capture_to_store(verifier=smollm2, prepared=prepared, output=hf_store, spec=SPEC, batch_size=4)
    a, b = ShardStore.open(vllm_store), ShardStore.open(hf_store)
    assert a.manifest.backend == "vllm" and a.manifest.spec == SPEC
    assert a.manifest.sample_num_tokens == b.manifest.sample_num_tokens
    for i in range(len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        got, want = a[i]["hidden_states"].float(), b[i]["hidden_states"].float()
        scale = want.abs().amax(dim=(0, 2), keepdim=True)  # per captured layer
        assert ((got - want).abs() / scale).max() < 1e-2, i

    conv = json.loads((regen / "conversations.jsonl").read_text().splitlines()[0])
    assert conv["messages"][-1]["content"].startswith("The capital of France is Paris")


@pytest.mark.slow
def test_post_norm_for_vllm_equals_the_verifier_norm(smollm2: Path):
    """The RMSNorm the vLLM backend applies for post_norm_last is the verifier's final norm."""
    from transformers import AutoModelForCausalLM

    from speculators_core.data.vllm_backend import _FinalRmsNorm

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    x = torch.randn(7, 576) * 300
    with torch.no_grad():
        torch.testing.assert_close(
            _FinalRmsNorm(smollm2)(x), model.model.norm(x), rtol=1e-5, atol=1e-5
        )
