"""Chat records and small helpers shared by the data-pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

from speculators_core.testing import TINY_CORPUS

#: A multi-turn chat with a system prompt, and one without, in both record styles.
CHATS = [
    {
        "conversations": [
            {"from": "system", "value": "You answer in one short sentence."},
            {"from": "human", "value": "What is the capital of France?"},
            {"from": "gpt", "value": "The capital of France is Paris."},
            {"from": "human", "value": "And the capital of Italy?"},
            {"from": "gpt", "value": "The capital of Italy is Rome."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "How do I sort a list in Python?"},
            {"role": "assistant", "content": "Use sorted(items) for a new list."},
            {"role": "user", "content": "And in place?"},
            {"role": "assistant", "content": "Call items.sort() on the list."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "Waves roll in, the tide goes out, gulls cry above."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Two plus two is four."},
        ]
    },
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write records one per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def many_chats(n: int) -> list[dict]:
    """``n`` varied two- or four-turn chats built from the tiny corpus."""
    sentences = TINY_CORPUS[:10]
    out = []
    for i in range(n):
        q, a = sentences[i % 10], sentences[(3 * i + 1) % 10]
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a * (1 + i % 3)}]
        if i % 2:
            turns += [
                {"role": "user", "content": sentences[(i + 5) % 10]},
                {"role": "assistant", "content": a},
            ]
        out.append({"messages": turns})
    return out
