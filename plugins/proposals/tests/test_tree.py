"""The dynamic draft tree: which nodes it takes, its verification in one forward, and that it
keeps the verifier's output on a draft that is accepted often (fitted to the verifier)."""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import pytest
import torch
from speculators_proposals import TREE, build_tree

from speculators_core import SpeculatorsError
from speculators_core.evaluate import ReferenceDecoder

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea."]
NEW_TOKENS = 20
K = 3


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from _support import fit_tiny_draft

    from speculators_core import load_speculator

    root = tmp_path_factory.mktemp("tree")
    fit = fit_tiny_draft(root, QUESTIONS, NEW_TOKENS, speculative_tokens=K)
    fit["draft_model"] = load_speculator(fit["draft"], verifier=fit["verifier"]).eval()
    return fit


def session_after(fit: dict[str, Any], prompt: list[int]) -> Any:
    """A drafting session over ``prompt`` and the verifier's first token, as the decoder makes."""
    from speculators_core.data.capture import StateRecorder

    draft, model = fit["draft_model"], fit["model"]
    recorder = StateRecorder(model, draft.hidden_state_spec())
    try:
        with torch.no_grad():
            first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
        session = draft.draft_session(batch_size=1)
        session.extend(torch.tensor([[*prompt, first]]), recorder.take())
    finally:
        recorder.close()
    return session


def test_the_tree_is_the_argmax_chain_then_the_best_scoring_paths(fitted: dict[str, Any]) -> None:
    """The draft's argmax chain first, then the ``budget - k`` paths of highest draft probability
    among the top-k children of every node (a child never scores above its parent): checked
    against every such path enumerated to depth k and the chain the session itself proposes."""
    session = session_after(fitted, fitted["prompts"][0])
    budget, top_k = 9, 3
    tokens, parents = build_tree(session, K, budget, top_k)
    assert len(tokens) == budget and all(p <= i for i, p in enumerate(parents))
    paths = [()]
    for token, parent in zip(tokens, parents, strict=True):
        paths.append((*paths[parent], token))
    assert max(len(p) for p in paths) <= K
    chain = tuple(session.propose(K).tokens[0].tolist())
    chain_paths = {chain[: i + 1] for i in range(K)}
    assert set(paths[1 : K + 1]) == chain_paths
    scored: list[tuple[float, tuple[int, ...]]] = []
    frontier = [((), 0.0)]
    while frontier:
        path, score = frontier.pop()
        if len(path) == K:
            continue
        log_probs = torch.log_softmax(session.next_logits(list(path)).float(), dim=-1)
        best = torch.topk(log_probs, top_k)
        for value, token in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            child = (*path, token)
            frontier.append((child, score + value))
            if child not in chain_paths:
                scored.append((score + value, child))
    want = chain_paths | {path for _, path in heapq.nlargest(budget - K, scored)}
    assert set(paths[1:]) == want


def test_greedy_tree_decoding_is_the_verifier_alone_and_accepts(fitted: dict[str, Any]) -> None:
    """Temperature 0 on a draft fitted to these very answers: every prompt gives the verifier's
    own greedy continuation, and tree paths (also through later siblings) are accepted."""
    decoder = ReferenceDecoder(fitted["model"], fitted["draft_model"], k=K, proposal=TREE)
    accepted = 0
    for prompt, greedy in zip(fitted["prompts"], fitted["greedy"], strict=True):
        result = decoder.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert result.tokens == greedy
        accepted += result.stats.num_accepted
    assert accepted > 0


def test_tree_acceptance_is_at_least_the_chains_on_a_fitted_draft(fitted: dict[str, Any]) -> None:
    """The tree holds the argmax chain, so at temperature 0 every round keeps at least what the
    chain would have kept from the same state; over these prompts' generations the mean
    acceptance length is at least the chain's (rounds start at other places, so this is a check
    on these prompts, not a theorem for every one)."""
    totals = {}
    for name, proposal in (("chain", None), ("tree", TREE)):
        decoder = ReferenceDecoder(fitted["model"], fitted["draft_model"], k=K, proposal=proposal)
        totals[name] = sum(
            decoder.generate(p, max_new_tokens=NEW_TOKENS).stats.mean_acceptance_length
            for p in fitted["prompts"]
        )
    assert totals["tree"] >= totals["chain"] - 1e-9


def test_a_draft_that_cannot_branch_is_refused_in_one_line(tiny_verifier: Path) -> None:
    """DFlash drafts a block per forward and cannot continue from given tokens."""
    dflash = pytest.importorskip("speculators_dflash")
    from transformers import AutoModelForCausalLM

    verifier = AutoModelForCausalLM.from_pretrained(tiny_verifier).eval()
    draft = dflash.DFlashDraftModel.from_verifier(tiny_verifier, aux_layer_ids=[1, 2, 3]).eval()
    decoder = ReferenceDecoder(verifier, draft, k=K, proposal=TREE)
    with pytest.raises(SpeculatorsError, match="next_logits") as caught:
        decoder.generate([5, 6, 7], max_new_tokens=4)
    assert "\n" not in str(caught.value)
