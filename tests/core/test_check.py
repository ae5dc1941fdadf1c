"""``speculators check``: a clean EAGLE-3 folder passes; each planted fault gives exactly its finding."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from speculators_core import PluginHost, PluginSettings
from speculators_core.check import CheckReport, read_tensor_infos
from speculators_core.check import check_checkpoint as _check_checkpoint
from speculators_core.cli.check import check_command

# The EAGLE-3 rules live in the eagle3 plugin (and the 'eagle' serving rule in the hass plugin):
# an isolated host holds both.
eagle3_plugin = pytest.importorskip("speculators_eagle3.plugin")
hass_plugin = pytest.importorskip("speculators_hass.plugin")
HOST = PluginHost(
    PluginSettings(),
    entry_points=False,
    plugins=[
        ("speculators.algorithms:eagle3", eagle3_plugin),
        ("speculators.algorithms:eagle", hass_plugin),
    ],
)


def check_checkpoint(folder: Path, **options: Any) -> CheckReport:
    return _check_checkpoint(folder, host=HOST, **options)


# Sizes of the session's tiny verifier (tests/conftest.py: make_tiny_verifier defaults).
V, H, HEADS, KV, HD, INTER, N_LAYERS, MAX_POS = 259, 64, 4, 2, 16, 128, 4, 512
VD = 128
AUX_IDS = [1, 2, 3]


def clean_parts(
    verifier: Path | str,
    *,
    vocab: int = V,
    layer_type: str = "llama",
    target_hidden: int | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A format-correct EAGLE-3 config and tensors (FORMAT.md 1.4), written out by hand."""
    config: dict[str, Any] = {
        "architectures": ["Eagle3DraftModel"],
        "draft_vocab_size": VD,
        "dtype": "float32",
        "eagle_aux_hidden_state_layer_ids": list(AUX_IDS),
        "norm_before_residual": True,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": 3,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": str(verifier)},
        },
        "speculators_model_type": "eagle3",
        "speculators_version": "0.1.0",
        "target_hidden_size": target_hidden,
        "transformer_layer_config": {
            "model_type": layer_type,
            "hidden_size": H,
            "intermediate_size": INTER,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV,
            "head_dim": HD,
            "num_hidden_layers": 1,
            "vocab_size": vocab,
            "max_position_embeddings": MAX_POS,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
        },
    }
    ht = target_hidden or H
    rand = torch.randn
    chosen = [i + i // 4 for i in range(VD)]  # the draft vocabulary, strictly increasing ids
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    tensors = {
        "embed_tokens.weight": rand(vocab, H),
        "fc.weight": rand(H, len(AUX_IDS) * ht),
        "layers.0.self_attn.q_proj.weight": rand(HEADS * HD, 2 * H),
        "layers.0.self_attn.k_proj.weight": rand(KV * HD, 2 * H),
        "layers.0.self_attn.v_proj.weight": rand(KV * HD, 2 * H),
        "layers.0.self_attn.o_proj.weight": rand(H, HEADS * HD),
        "layers.0.mlp.gate_proj.weight": rand(INTER, H),
        "layers.0.mlp.up_proj.weight": rand(INTER, H),
        "layers.0.mlp.down_proj.weight": rand(H, INTER),
        "layers.0.input_layernorm.weight": torch.ones(H),
        "layers.0.hidden_norm.weight": torch.ones(H),
        "layers.0.post_attention_layernorm.weight": torch.ones(H),
        "norm.weight": torch.ones(H),
        "lm_head.weight": rand(VD, H),
        "d2t": torch.tensor([t - i for i, t in enumerate(chosen)], dtype=torch.int64),
        "t2d": t2d,
    }
    if layer_type == "qwen3":
        tensors["layers.0.self_attn.q_norm.weight"] = torch.ones(HD)
        tensors["layers.0.self_attn.k_norm.weight"] = torch.ones(HD)
    return config, tensors


def write(
    folder: Path, config: dict[str, Any] | None, tensors: dict[str, torch.Tensor] | None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tensors is not None:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors")
        )
    return folder


# ------------------------------------------------------------------------------------------------
# Planted faults: (case id, mutation of (config, tensors), expected finding code, text in the line)
# ------------------------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any], dict[str, torch.Tensor]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(config: dict[str, Any], _t: dict[str, torch.Tensor]) -> None:
        *parents, last = path.split(".")
        node: Any = config
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(config: dict[str, Any], _t: dict[str, torch.Tensor]) -> None:
        *parents, last = path.split(".")
        node: Any = config
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]

    return mutate


def _tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    return lambda _c, t: fn(t)


def _prefix_all(t: dict[str, torch.Tensor]) -> None:
    for name in list(t):
        t["model." + name] = t.pop(name)


def _fuse_qkv(t: dict[str, torch.Tensor]) -> None:
    parts = [t.pop(f"layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    t["layers.0.self_attn.qkv_proj.weight"] = torch.cat(parts, 0)


def _both_norms(config: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    config["norm_before_fc"] = True
    config["fc_norm"] = True
    t["input_norm.weight"] = torch.ones(3 * H)
    for i in range(3):
        t[f"fc_norm.{i}.weight"] = torch.ones(H)


def _unsorted_d2t(t: dict[str, torch.Tensor]) -> None:
    t["d2t"][0], t["d2t"][1] = 5, -1  # draft 0 -> 5, draft 1 -> 0: not increasing


FAULTS: list[tuple[str, Mutation, str, str]] = [
    ("top-level model_type", _set("model_type", "llama"), "model-type-top-level", "'llama'"),
    (
        "no speculators_config",
        _delete("speculators_config"),
        "speculators-config",
        "speculators_config",
    ),
    ("type eagle", _set("speculators_model_type", "eagle"), "speculators-model-type", "'eagle'"),
    ("type medusa", _set("speculators_model_type", "medusa"), "speculators-model-type", "'medusa'"),
    ("layer config a string", _set("transformer_layer_config", "llama"), "layer-config", "a str"),
    (
        "layer model_type",
        _set("transformer_layer_config.model_type", "mistral"),
        "layer-model-type",
        "'mistral'",
    ),
    (
        "layer config sizes",
        _delete("transformer_layer_config.intermediate_size"),
        "layer-config-fields",
        "intermediate_size",
    ),
    (
        "no speculative_tokens",
        _delete("speculators_config.proposal_methods.0.speculative_tokens"),
        "speculative-tokens",
        "missing",
    ),
    (
        "default proposal",
        _set("speculators_config.default_proposal_method", "tree"),
        "default-proposal",
        "'tree'",
    ),
    (
        "no verifier name",
        _delete("speculators_config.verifier.name_or_path"),
        "verifier-name",
        "name_or_path",
    ),
    (
        "verifier path missing",
        _set("speculators_config.verifier.name_or_path", "/nonexistent/train-box/verifier"),
        "verifier-path",
        "/nonexistent/train-box/verifier",
    ),
    (
        "norm_before_residual absent",
        _delete("norm_before_residual"),
        "norm-before-residual",
        "assumes true",
    ),
    ("both fc norms", _both_norms, "norm-flags", "both true"),
    (
        "aux ids absent",
        _delete("eagle_aux_hidden_state_layer_ids"),
        "aux-ids-missing",
        "not written",
    ),
    (
        "aux ids invalid",
        _set("eagle_aux_hidden_state_layer_ids", [1, 1, 2]),
        "aux-ids-invalid",
        "[1, 1, 2]",
    ),
    (
        "aux id count vs fc",
        _set("eagle_aux_hidden_state_layer_ids", [1, 3]),
        "aux-ids-fc-width",
        "fc.weight takes 192 inputs but 2",
    ),
    (
        "aux ids order",
        _set("eagle_aux_hidden_state_layer_ids", [3, 1, 2]),
        "aux-ids-order",
        "[3, 1, 2]",
    ),
    (
        "aux ids range",
        _set("eagle_aux_hidden_state_layer_ids", [1, 2, 9]),
        "aux-ids-range",
        "4 layers",
    ),
    ("draft vocab size", _set("draft_vocab_size", 0), "draft-vocab-size", "draft_vocab_size 0"),
    (
        "max positions",
        _set("transformer_layer_config.max_position_embeddings", 256),
        "max-position-embeddings",
        "256",
    ),
    ("reduced vocab without d2t", _tensors(lambda t: t.pop("d2t")), "d2t-missing", "no d2t"),
    ("d2t int32", _tensors(lambda t: t.update(d2t=t["d2t"].int())), "d2t-dtype", "I32"),
    ("t2d uint8", _tensors(lambda t: t.update(t2d=t["t2d"].to(torch.uint8))), "t2d-dtype", "U8"),
    (
        "d2t length",
        _tensors(lambda t: t.update(d2t=t["d2t"][:-1].clone())),
        "d2t-shape",
        f"[{VD - 1}]",
    ),
    (
        "t2d length",
        _tensors(lambda t: t.update(t2d=t["t2d"][:-1].clone())),
        "t2d-shape",
        f"[{V - 1}]",
    ),
    ("d2t values", _tensors(_unsorted_d2t), "d2t-values", "strictly increasing"),
    (
        "lm_head rows",
        _tensors(lambda t: t.update({"lm_head.weight": torch.randn(VD - 8, H)})),
        "lm-head-rows",
        f"[{VD - 8}, {H}]",
    ),
    (
        "embed rows",
        _tensors(lambda t: t.update({"embed_tokens.weight": torch.randn(V - 9, H)})),
        "embed-rows",
        f"[{V - 9}, {H}]",
    ),
    ("prefixed names", _tensors(_prefix_all), "tensor-prefixed", "model.embed_tokens.weight"),
    ("fused qkv", _tensors(_fuse_qkv), "tensor-fused", "layers.0.self_attn.qkv_proj.weight"),
    (
        "verifier tensor saved",
        _tensors(lambda t: t.update({"verifier_lm_head.weight": torch.randn(VD, H)})),
        "tensor-unknown",
        "verifier_lm_head.weight",
    ),
    (
        "missing hidden_norm",
        _tensors(lambda t: t.pop("layers.0.hidden_norm.weight")),
        "tensor-missing",
        "layers.0.hidden_norm.weight",
    ),
    (
        "q_proj not 2H wide",
        _tensors(
            lambda t: t.update({"layers.0.self_attn.q_proj.weight": torch.randn(HEADS * HD, H)})
        ),
        "tensor-shape",
        "[64, 64] (expected [64, 128])",
    ),
    (
        "integer weight",
        _tensors(lambda t: t.update({"fc.weight": t["fc.weight"].int()})),
        "tensor-dtype",
        "fc.weight (I32)",
    ),
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, tiny_verifier: Path) -> Path:
    config, tensors = clean_parts(tiny_verifier)
    return write(tmp_path_factory.mktemp("clean"), config, tensors)


def test_tiny_verifier_matches_the_sizes_assumed_here(tiny_verifier: Path):
    data = json.loads((tiny_verifier / "config.json").read_text())
    assert (data["vocab_size"], data["hidden_size"], data["num_hidden_layers"]) == (V, H, N_LAYERS)
    assert data["max_position_embeddings"] == MAX_POS


@pytest.mark.parametrize("layer_type", ["llama", "qwen3"])
def test_clean_checkpoint_has_no_findings(tmp_path: Path, tiny_verifier: Path, layer_type: str):
    config, tensors = clean_parts(tiny_verifier, layer_type=layer_type)
    report = check_checkpoint(write(tmp_path / "d", config, tensors))
    assert report.findings == []
    assert report.algorithm == "eagle3"
    assert report.num_tensors == len(tensors)
    assert report.verifier == tiny_verifier  # found through verifier.name_or_path


@pytest.mark.parametrize(("case", "mutate", "code", "text"), FAULTS, ids=[f[0] for f in FAULTS])
def test_each_planted_fault_gives_exactly_its_finding(
    tmp_path: Path, tiny_verifier: Path, case: str, mutate: Mutation, code: str, text: str
):
    config, tensors = clean_parts(tiny_verifier)
    mutate(config, tensors)
    folder = write(tmp_path / "d", config, tensors)
    report = check_checkpoint(folder)
    assert report.codes == [code], [str(f) for f in report.findings]
    line = str(report.findings[0])
    assert text in line
    assert line.startswith(f"{folder}/")
    assert "; " in line and "\n" not in line  # "<file>: <problem>; <fix>" on one line


def test_sharded_weights_are_read_through_the_index(tmp_path: Path, tiny_verifier: Path):
    config, tensors = clean_parts(tiny_verifier)
    folder = write(tmp_path / "d", config, None)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:7],
        "model-00002-of-00002.safetensors": names[7:],
    }
    weight_map = {}
    for shard, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    infos = read_tensor_infos(folder)
    assert {n: i.shape for n, i in infos.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    assert check_checkpoint(folder).findings == []

    (folder / "model-00002-of-00002.safetensors").unlink()
    assert check_checkpoint(folder).codes == ["weights-unreadable"]


def test_missing_weights_and_pytorch_bin(tmp_path: Path, tiny_verifier: Path):
    config, _ = clean_parts(tiny_verifier)
    folder = write(tmp_path / "d", config, None)
    assert check_checkpoint(folder).codes == ["weights-missing"]
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    assert check_checkpoint(folder).codes == ["weights-format"]


def test_not_a_folder_and_not_a_speculator(tmp_path: Path, tiny_verifier: Path):
    assert check_checkpoint(tmp_path / "nope").codes == ["folder-missing"]
    assert check_checkpoint(tmp_path).codes == ["config-missing"]
    (tmp_path / "config.json").write_text("{not json")
    assert check_checkpoint(tmp_path).codes == ["config-json"]
    report = check_checkpoint(tiny_verifier)  # a plain Llama folder
    assert report.codes == ["not-speculators"] and "'llama'" in str(report.findings[0])


def test_vocab_size_differs_from_the_verifier(tmp_path: Path, tiny_verifier: Path):
    # Self-consistent for a 300-token vocabulary, but the verifier has 259.
    config, tensors = clean_parts(tiny_verifier, vocab=300)
    report = check_checkpoint(write(tmp_path / "d", config, tensors))
    assert report.codes == ["vocab-size-verifier"]
    assert "300" in str(report.findings[0]) and str(V) in str(report.findings[0])


def test_vocab_size_smaller_than_the_tokenizer(tmp_path: Path, tiny_verifier: Path):
    # A verifier whose config claims 250 rows while its tokenizer has 259 tokens.
    verifier = tmp_path / "verifier"
    shutil.copytree(tiny_verifier, verifier)
    data = json.loads((verifier / "config.json").read_text())
    data["vocab_size"] = 250
    (verifier / "config.json").write_text(json.dumps(data))
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(verifier))) == V
    config, tensors = clean_parts(verifier, vocab=250)
    report = check_checkpoint(write(tmp_path / "d", config, tensors))
    assert report.codes == ["vocab-size-tokenizer"]
    assert f"({V} tokens)" in str(report.findings[0])


def test_target_hidden_size_for_a_narrower_verifier(tmp_path: Path):
    from speculators_core.testing import make_tiny_verifier

    narrow = make_tiny_verifier(tmp_path / "narrow", hidden_size=32, num_heads=2, num_kv_heads=1)
    config, tensors = clean_parts(narrow, target_hidden=32)
    folder = write(tmp_path / "d", config, tensors)
    assert check_checkpoint(folder).findings == []  # fc is [64, 3 x 32] and says so

    config["target_hidden_size"] = None
    write(folder, config, None)
    report = check_checkpoint(folder)
    assert report.codes == ["target-hidden-size"]
    assert "set target_hidden_size to 32" in str(report.findings[0])

    # Against a verifier of the draft's own width, the same folder is the wrong verifier.
    config["target_hidden_size"] = 32
    write(folder, config, None)
    assert check_checkpoint(folder, verifier=tmp_path / "narrow").findings == []


def test_explicit_verifier_is_used_and_must_exist(tmp_path: Path, tiny_verifier: Path, clean: Path):
    from speculators_core.errors import SpeculatorsError

    # The recorded path does not exist here, but --verifier supplies one.
    config, tensors = clean_parts("/elsewhere/verifier")
    folder = write(tmp_path / "d", config, tensors)
    report = check_checkpoint(folder, verifier=tiny_verifier)
    assert report.codes == ["verifier-path"] and report.verifier == tiny_verifier
    with pytest.raises(SpeculatorsError, match="not a model folder"):
        check_checkpoint(clean, verifier=tmp_path / "missing")


def test_a_hub_id_is_not_a_missing_path(tmp_path: Path, tiny_verifier: Path):
    config, tensors = clean_parts("HuggingFaceTB/SmolLM2-135M-Instruct")
    report = check_checkpoint(write(tmp_path / "d", config, tensors))
    assert report.findings == [] and report.verifier is None


def test_cli_clean_and_faulty(tmp_path: Path, tiny_verifier: Path, clean: Path):
    runner = CliRunner()
    result = runner.invoke(check_command, [str(clean)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{clean}: OK (eagle3, 16 tensors checked")

    config, tensors = clean_parts(tiny_verifier)
    del config["norm_before_residual"]
    tensors.pop("d2t")
    folder = write(tmp_path / "d", config, tensors)
    result = runner.invoke(check_command, [str(folder)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{folder}/config.json: norm_before_residual is not written")
    assert lines[1].startswith(
        f"{folder}/model.safetensors: draft_vocab_size {VD} < vocab_size {V}"
    )

    result = runner.invoke(check_command, [str(folder), "--json"])
    assert result.exit_code == 1
    assert [f["code"] for f in json.loads(result.output)] == ["norm-before-residual", "d2t-missing"]


def test_cli_through_the_root_command(clean: Path):
    """The built-in 'speculators check' is this command (exit code and output included)."""
    from _support import run_cli

    out = run_cli(["check", str(clean)])
    assert out.returncode == 0 and ": OK (eagle3" in out.stdout


def test_a_draft_saved_by_the_eagle3_plugin_is_clean(tmp_path: Path, tiny_verifier: Path):
    eagle3 = pytest.importorskip("speculators_eagle3")
    counts = torch.arange(V)  # any counts: the most frequent VD ids become the draft vocabulary
    model = eagle3.Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=VD, token_counts=counts
    )
    model.save_pretrained(tmp_path / "draft")
    report = check_checkpoint(tmp_path / "draft")
    assert report.findings == [], [str(f) for f in report.findings]
    assert report.verifier == tiny_verifier
