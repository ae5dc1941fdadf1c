"""``tree``: an EAGLE-2-style dynamic draft tree, verified in one verifier forward.

Drafting (after Li et al. 2024, EAGLE-2): every node of the tree is a drafted token; its score
is the product of the draft's probabilities along its path (the draft's confidence that the
verifier reaches it). The draft's own argmax chain (depth ``k``) is taken first, so the tree
never accepts less than the chain at temperature 0; then, best-first, the highest-scoring
candidate is taken and its ``top_k`` most probable children become candidates, until the tree
holds ``budget`` nodes; no node is deeper than ``k``. (Best-first alone makes wide, shallow
trees when the draft is unsure: measured on a tiny fitted draft, it accepted less than the
chain.) The draft is asked for each node's
children through its session's ``next_logits(path)`` (chain drafts: EAGLE-3, EAGLE-1/HASS).

Verification: one verifier forward over the root and every node, each node seeing the verified
context and its own ancestors, at the position its depth gives. From the root down:

* temperature 0: follow the child whose token is the verifier's argmax; stop where none is, and
  emit the verifier's argmax there. The output is the verifier's greedy output.
* temperature T > 0: the children are fixed candidates (one-hot proposals). Starting from the
  verifier's distribution ``p`` at the node, each child ``c`` in order of score is accepted with
  probability ``r(c)``, where ``r`` is ``p`` with the rejected siblings removed and renormalized;
  when all are rejected a token is drawn from ``r``. Each emitted token is distributed exactly as
  ``p`` (sequential sampling without replacement), so the output follows the verifier.

vLLM 0.32 for CPU has no tree attention (its ``speculative_token_tree`` needs the GPU tree
attention backend); the method runs in the reference decoder.
"""

from __future__ import annotations

import heapq
from typing import Any, Literal

import torch
from pydantic import Field

from speculators_core import SpeculatorsError, TokenProposalConfig
from speculators_core.proposals import RoundResult, Verify

__all__ = ["TREE_BUDGET", "TREE_TOP_K", "TreeTokenProposalConfig", "build_tree", "tree_round"]

#: Nodes per tree (drafted tokens verified per round) and children considered per node.
TREE_BUDGET = 16
TREE_TOP_K = 4


class TreeTokenProposalConfig(TokenProposalConfig):
    """A dynamic draft tree of ``budget`` nodes, ``top_k`` children per node, depth at most
    ``speculative_tokens``."""

    proposal_type: Literal["tree"] = "tree"
    speculative_tokens: int = Field(default=3, ge=1)
    budget: int = Field(default=TREE_BUDGET, ge=1)
    top_k: int = Field(default=TREE_TOP_K, ge=1)


def build_tree(
    session: Any, depth: int, budget: int = TREE_BUDGET, top_k: int = TREE_TOP_K
) -> tuple[list[int], list[int]]:
    """The tree's tokens and parents (rows: 0 is the root, ``i + 1`` node ``i``), nodes in the
    order they were taken (a parent always before its children, siblings by score).

    The draft's argmax chain (up to ``depth`` nodes) is taken first, so the tree holds every
    chain a chain method would draft and at temperature 0 accepts at least as much; the rest of
    the budget goes best-first to the most probable paths among the top-k children of the nodes
    taken.
    """
    if not hasattr(session, "next_logits"):
        raise SpeculatorsError(
            f"the tree proposal needs a draft session that continues from given tokens "
            f"(next_logits); {type(session).__name__} drafts otherwise, use a chain method"
        )
    tokens: list[int] = []
    parents: list[int] = []
    paths: list[tuple[int, ...]] = [()]  # by row
    candidates: list[tuple[float, int, int, int]] = []  # (-log score, order, token, parent row)
    taken: set[int] = set()  # orders of candidates already in the tree
    order = 0

    def expand(row: int, log_score: float) -> int | None:
        """Push the top-k children of ``row``; return the order of its most probable one."""
        nonlocal order
        log_probs = torch.log_softmax(session.next_logits(list(paths[row])).float(), dim=-1)
        best = torch.topk(log_probs, min(top_k, int(torch.isfinite(log_probs).sum())))
        first = order if best.values.numel() else None
        for value, token in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            heapq.heappush(candidates, (-(log_score + value), order, token, row))
            order += 1
        return first

    def take(entry: tuple[float, int, int, int]) -> int | None:
        negative, key, token, parent = entry
        taken.add(key)
        tokens.append(token)
        parents.append(parent)
        paths.append((*paths[parent], token))
        return expand(len(tokens), -negative) if len(paths[-1]) < depth else None

    chain_next = expand(0, 0.0)
    while chain_next is not None and len(tokens) < budget:  # the argmax chain first
        entry = next(c for c in candidates if c[1] == chain_next)
        chain_next = take(entry)
    while candidates and len(tokens) < budget:
        entry = heapq.heappop(candidates)
        if entry[1] not in taken:
            take(entry)
    return tokens, parents


def tree_round(
    method: Any,
    session: Any,
    verify: Verify,
    k: int,
    temperature: float,
    generator: torch.Generator | None = None,
    *,
    budget: int = TREE_BUDGET,
    top_k: int = TREE_TOP_K,
) -> RoundResult:
    """One tree round (see the module doc); ``k`` is the tree's depth."""
    tokens, parents = build_tree(session, k, budget, top_k)
    logits = verify(tokens, parents)  # [1 + n, V]
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i + 1)
    path: list[int] = []
    row = 0
    while True:
        kids = children.get(row, [])
        if temperature <= 0:
            target = int(logits[row].argmax())
            match = next((c for c in kids if tokens[c - 1] == target), None)
            if match is None:
                return RoundResult(path=path, next_token=target)
        else:
            residual = torch.softmax(logits[row].float() / temperature, dim=-1)
            match = None
            for child in kids:
                token = tokens[child - 1]
                if float(torch.rand((), generator=generator)) < float(residual[token]):
                    match = child
                    break
                residual[token] = 0.0
                total = float(residual.sum())
                if total <= 0:  # every token was a rejected sibling: only through rounding
                    residual = torch.softmax(logits[row].float() / temperature, dim=-1)
                    break
                residual = residual / total
            if match is None:
                drawn = int(torch.multinomial(residual, 1, generator=generator))
                return RoundResult(path=path, next_token=drawn)
        path.append(match)
        row = match
