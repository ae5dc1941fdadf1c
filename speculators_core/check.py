"""``speculators check``: an offline linter of a speculator folder against what vLLM reads.

It checks a folder without vLLM and without loading weights. The core runs the generic checks
every speculators folder must pass (FORMAT.md 2.9): ``config.json`` is a speculators config
(no top-level ``model_type``, a ``speculators_model_type`` an installed plugin provides,
``speculators_config`` with a proposal method and a verifier), and the weights are safetensors
whose headers are readable, with bare (unprefixed, unfused) tensor names. Then the folder's
algorithm checks the rest with its own rules: the ``lint`` of its
:class:`~speculators_core.plugins.records.Algorithm` record, looked up in the plugin host by
``speculators_model_type`` (see :mod:`speculators_core.lint` for what a rule sees). A type no
installed plugin provides gives one finding naming what to install.

When the verifier is reachable (``verifier=`` or a local
``speculators_config.verifier.name_or_path``) the algorithm's rules get it to compare with.

Every problem is a :class:`Finding` that prints as one line, ``<file>: <problem>; <fix>``.
Findings of one kind are grouped (three prefixed tensor names are one finding listing them),
so a single fault gives a single line. Generic findings come first, then the algorithm's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speculators_core.errors import PluginError, SpeculatorsError
from speculators_core.lint import (
    CONFIG_FILE,
    FUSED_PROJECTIONS,
    INDEX_FILE,
    WEIGHTS_FILE,
    Finding,
    LintContext,
    TensorInfo,
    VerifierInfo,
    as_int,
    format_names,
    looks_like_local_path,
    read_safetensors_header,
    read_tensor_infos,
)

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost
    from speculators_core.plugins.records import Algorithm

__all__ = [
    "CheckReport",
    "Finding",
    "TensorInfo",
    "check_checkpoint",
    "load_verifier_info",
    "looks_like_local_path",
    "read_safetensors_header",
    "read_tensor_infos",
]

logger = logging.getLogger(__name__)

# Prefixes that wrappers (DDP, FSDP, a parent module) put in front of the real names.
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "draft_model.", "speculator.", "drafter.")


@dataclass
class CheckReport:
    """The outcome of :func:`check_checkpoint`.

    ``notes`` are informational lines that are not problems (the algorithm has no lint rules of
    its own, or vLLM cannot serve it); the CLI prints them on stderr.
    """

    folder: Path
    findings: list[Finding] = field(default_factory=list)
    algorithm: str | None = None
    num_tensors: int = 0
    verifier: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    @property
    def codes(self) -> list[str]:
        """The finding codes, in order."""
        return [f.code for f in self.findings]


def load_verifier_info(folder: Path) -> VerifierInfo | None:
    """The verifier in ``folder`` (its config and tokenizer length), or None if unreadable."""
    from speculators_core.data.verifier import read_verifier_config

    try:
        # The one verifier-config reader (multimodal verifiers' text_config merged in).
        data = read_verifier_config(folder)
    except SpeculatorsError:
        return None
    tokenizer_len: int | None = None
    try:
        from transformers import AutoTokenizer

        tokenizer_len = len(AutoTokenizer.from_pretrained(str(folder)))
    except Exception as err:  # any tokenizer problem only skips the tokenizer check
        logger.info("could not load the tokenizer of %s: %r", folder, err)
    return VerifierInfo(
        folder=folder,
        config=data,
        num_layers=as_int(data.get("num_hidden_layers")),
        hidden_size=as_int(data.get("hidden_size")),
        vocab_size=as_int(data.get("vocab_size")),
        max_positions=as_int(data.get("max_position_embeddings")),
        tokenizer_len=tokenizer_len,
    )


class _Checker:
    def __init__(self, folder: Path, verifier: Path | None, host: PluginHost) -> None:
        self.folder = folder
        self.config_file = str(folder / CONFIG_FILE)
        self.weights_file = str(folder / WEIGHTS_FILE)
        self.explicit_verifier = verifier
        self.host = host
        self.report = CheckReport(folder=folder)

    def add(self, file: str, code: str, problem: str, fix: str) -> None:
        self.report.findings.append(Finding(file, code, problem, fix))

    def config(self, code: str, problem: str, fix: str) -> None:
        self.add(self.config_file, code, problem, fix)

    def weights(self, code: str, problem: str, fix: str) -> None:
        self.add(self.weights_file, code, problem, fix)

    def run(self) -> CheckReport:
        if not self.folder.is_dir():
            self.add(
                str(self.folder),
                "folder-missing",
                "is not a folder",
                "pass the folder that holds the speculator's config.json and safetensors",
            )
            return self.report
        data = self._read_config()
        if data is None:
            return self.report
        if "speculators_config" not in data and "speculators_model_type" not in data:
            kind = data.get("model_type")
            self.config(
                "not-speculators",
                "is not a speculators-format config (no speculators_config"
                + (f"; model_type '{kind}'" if kind else "")
                + ")",
                "convert the checkpoint with 'speculators convert', or check a speculator folder",
            )
            return self.report
        kind = data.get("speculators_model_type")
        self.report.algorithm = kind if isinstance(kind, str) else None
        algorithm = self._check_top_level(data)
        verifier = self._check_speculators_config(data)
        tensors, fused = self._check_weights()
        if algorithm is None:
            return self.report
        if algorithm.lint is None:
            self.report.notes.append(
                f"algorithm '{algorithm.name}' ({algorithm.provided_by}) has no lint rules of "
                "its own; only the generic checks ran"
            )
            return self.report
        context = LintContext(
            folder=self.folder, config=data, tensors=tensors, fused=fused, verifier=verifier
        )
        try:
            self.report.findings.extend(algorithm.lint(context))
        except Exception as err:  # a plugin's bug must not hide the generic findings
            logger.debug("lint of algorithm %s failed", algorithm.name, exc_info=True)
            self.config(
                "lint-failed",
                f"the lint rules of algorithm '{algorithm.name}' ({algorithm.provided_by}) "
                f"failed: {err!r}",
                "report it to the plugin's authors (the generic checks above still ran)",
            )
        return self.report

    # ------------------------------------------------------------------ config.json

    def _read_config(self) -> dict[str, Any] | None:
        path = Path(self.config_file)
        if not path.is_file():
            self.config(
                "config-missing",
                "does not exist",
                "save the speculator with save_pretrained (it writes config.json)",
            )
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self.config("config-json", f"is not valid JSON ({err})", "fix or re-save it")
            return None
        if not isinstance(data, dict):
            self.config(
                "config-json", f"holds a {type(data).__name__}, not an object", "re-save it"
            )
            return None
        return data

    def _check_top_level(self, data: Mapping[str, Any]) -> Algorithm | None:
        """Top-level ``model_type`` and ``speculators_model_type``; the algorithm, if installed."""
        if "model_type" in data:
            self.config(
                "model-type-top-level",
                f"has a top-level 'model_type' ({data['model_type']!r}), so vLLM does not "
                "detect it as a speculator",
                "delete the top-level 'model_type' key (the type is speculators_model_type)",
            )
        kind = data.get("speculators_model_type")
        if not isinstance(kind, str) or not kind:
            self.config(
                "speculators-model-type",
                "has no speculators_model_type",
                "set speculators_model_type to the algorithm the draft was built with "
                f"(installed: {', '.join(sorted(self._installed())) or 'none'})",
            )
            return None
        try:
            algorithm = self.host.algorithm(kind)
        except PluginError as err:
            # The host's message names what to install (or which plugin failed to load).
            problem, _, fix = str(err).rpartition("; ")
            self.config(
                "speculators-model-type",
                f"speculators_model_type {kind!r}: {problem or err}",
                fix or "install the plugin that provides it (see 'speculators plugins')",
            )
            return None
        serving = algorithm.vllm
        if serving is None:
            self.report.notes.append(
                f"vLLM cannot serve algorithm '{kind}' ({algorithm.provided_by}): its plugin "
                "gives no vLLM serving information"
            )
        elif serving.export:
            self.config(
                "speculators-model-type",
                f"speculators_model_type {kind!r} is not read by vLLM (it serves an export of "
                f"the draft, with method {serving.method!r})",
                serving.export,
            )
        return algorithm

    def _installed(self) -> list[str]:
        try:
            return list(self.host.algorithms())
        except PluginError:
            return []

    def _check_speculators_config(self, data: Mapping[str, Any]) -> VerifierInfo | None:
        spec = data.get("speculators_config")
        if not isinstance(spec, dict):
            self.config(
                "speculators-config",
                "has no speculators_config object",
                "add speculators_config with algorithm, proposal_methods, "
                "default_proposal_method and verifier",
            )
            if self.explicit_verifier is not None:
                return self._use_verifier(self.explicit_verifier)
            return None
        self._check_proposals(spec)
        return self._check_verifier_name(spec)

    def _check_proposals(self, spec: Mapping[str, Any]) -> None:
        methods = spec.get("proposal_methods")
        methods = methods if isinstance(methods, list) else []
        first = methods[0] if methods else None
        tokens = as_int(first.get("speculative_tokens")) if isinstance(first, dict) else None
        if tokens is None or tokens < 1:
            self.config(
                "speculative-tokens",
                "speculators_config.proposal_methods[0].speculative_tokens is "
                + ("missing" if tokens is None else f"{tokens}")
                + " (vLLM reads it as num_speculative_tokens)",
                "add a proposal method {'proposal_type': 'greedy', 'speculative_tokens': 3}",
            )
            return
        default = spec.get("default_proposal_method")
        kinds = [m.get("proposal_type") for m in methods if isinstance(m, dict)]
        if default is not None and default not in kinds:
            self.config(
                "default-proposal",
                f"default_proposal_method {default!r} names none of the proposal_methods "
                f"({format_names(str(k) for k in kinds)})",
                "set it to the proposal_type of one entry, e.g. 'greedy'",
            )

    def _check_verifier_name(self, spec: Mapping[str, Any]) -> VerifierInfo | None:
        entry = spec.get("verifier")
        name = entry.get("name_or_path") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            self.config(
                "verifier-name",
                "speculators_config.verifier.name_or_path is missing (vLLM serves that model "
                "as the target)",
                "set it to the verifier's hub id or its path where vLLM runs",
            )
        elif looks_like_local_path(name) and not Path(name).expanduser().exists():
            self.config(
                "verifier-path",
                f"speculators_config.verifier.name_or_path '{name}' is a path that does not "
                "exist here, so 'vllm serve' on this folder cannot load the verifier",
                "set it to a hub id or the verifier's path on the serving machine, or serve "
                "with --speculative-config and the verifier as the model",
            )
        folder = self.explicit_verifier
        if folder is None and isinstance(name, str) and name.strip():
            candidate = Path(name).expanduser()
            if (candidate / CONFIG_FILE).is_file():
                folder = candidate
        return None if folder is None else self._use_verifier(folder)

    def _use_verifier(self, folder: Path) -> VerifierInfo | None:
        verifier = load_verifier_info(folder)
        self.report.verifier = folder if verifier is not None else None
        return verifier

    # ------------------------------------------------------------------ weights

    def _check_weights(self) -> tuple[dict[str, TensorInfo], tuple[str, ...]]:
        """Read the headers; report missing, unreadable, prefixed and fused tensors."""
        try:
            tensors = read_tensor_infos(self.folder)
        except SpeculatorsError as err:
            self._weights_missing(str(err))
            tensors = {}
        self.report.num_tensors = len(tensors)
        names = self._normalize_names(tensors)
        fused = tuple(sorted(n for n in names if any(f".{f}." in n for f in FUSED_PROJECTIONS)))
        if fused:
            self.weights(
                "tensor-fused",
                f"{format_names(fused)} are fused projections; vLLM loads unfused HF-style "
                "q_proj/k_proj/v_proj and gate_proj/up_proj and fuses them itself",
                "split them into the separate projections before saving",
            )
        return names, fused

    def _weights_missing(self, message: str) -> None:
        if (self.folder / "pytorch_model.bin").is_file():
            self.weights(
                "weights-format",
                "does not exist; the weights are in pytorch_model.bin",
                "re-save with safetensors (save_pretrained writes model.safetensors)",
            )
        elif "unreadable" in message:
            self.weights("weights-unreadable", message.split(": ", 1)[-1], "re-save the weights")
        else:
            self.weights(
                "weights-missing",
                f"does not exist (nor {INDEX_FILE})",
                "save the speculator with save_pretrained",
            )

    def _normalize_names(self, tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Strip wrapper prefixes (reporting them once) so later checks see the real names."""
        prefixed: list[str] = []
        out: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            real = name
            while real.startswith(_WRAPPER_PREFIXES):
                real = real.split(".", 1)[1]
            if real != name:
                prefixed.append(name)
            if real.startswith("midlayer."):  # SafeAILab layout; vLLM maps it to layers.0
                real = "layers.0." + real[len("midlayer.") :]
            out[real] = info
        if prefixed:
            self.weights(
                "tensor-prefixed",
                f"{len(prefixed)} tensor name(s) carry a wrapper prefix ({format_names(prefixed)}); "
                "vLLM adds 'model.' itself and cannot find them",
                "save the bare module names (fc.weight, layers.0..., lm_head.weight)",
            )
        return out


def check_checkpoint(
    folder: str | os.PathLike[str],
    *,
    host: PluginHost,
    verifier: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Lint a speculator folder against what vLLM reads (FORMAT.md 2.9); see the module doc.

    ``host`` is the plugin host whose algorithms' rules run (the CLI passes its own).
    ``verifier`` is a local verifier folder to compare with; by default the folder named by
    ``speculators_config.verifier.name_or_path`` is used when it exists here. Raises
    :class:`SpeculatorsError` only when ``verifier`` is given and is not a model folder.
    """
    verifier_path = None
    if verifier is not None:
        verifier_path = Path(verifier)
        if not (verifier_path / CONFIG_FILE).is_file():
            raise SpeculatorsError(
                f"verifier '{verifier_path}' is not a model folder (no config.json); pass the "
                "verifier's local folder"
            )
    return _Checker(Path(folder), verifier_path, host).run()
