"""Fitting earlier turns into the context: oldest exchanges go first, whole, and only when needed."""

from __future__ import annotations

import pytest

from app.errors import APIError
from app.generate.engine import ChatMessage
from app.generate.history import build_messages, fit_history


class WordCounter:
    """Counts one token per word plus 3 per message, and remembers how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def tokens(self, messages: list[ChatMessage]) -> int:
        return sum(len(m["content"].split()) + 3 for m in messages)

    async def __call__(self, messages: list[ChatMessage]) -> int:
        self.calls += 1
        return self.tokens(messages)


def exchanges(count: int, words: int = 10) -> list[ChatMessage]:
    history: list[ChatMessage] = []
    for i in range(count):
        history.append({"role": "user", "content": " ".join([f"q{i}"] * words)})
        history.append({"role": "assistant", "content": " ".join([f"a{i}"] * words)})
    return history


def test_messages_are_system_history_then_prompt() -> None:
    history = exchanges(1)
    assert build_messages("Be brief.", history, "next") == [
        {"role": "system", "content": "Be brief."},
        *history,
        {"role": "user", "content": "next"},
    ]
    assert build_messages(None, [], "only")[0] == {"role": "user", "content": "only"}


@pytest.mark.asyncio
async def test_history_that_fits_is_sent_whole_after_one_count() -> None:
    counter = WordCounter()
    fitted = await fit_history("sys", exchanges(3), "hello", prompt_budget=1000, count_tokens=counter)
    assert fitted.messages == build_messages("sys", exchanges(3), "hello")
    assert not fitted.truncated
    assert counter.calls == 1


@pytest.mark.asyncio
async def test_without_history_or_budget_nothing_is_counted() -> None:
    counter = WordCounter()
    assert not (await fit_history(None, [], "hi", prompt_budget=5, count_tokens=counter)).truncated
    assert not (await fit_history(None, exchanges(50), "hi", prompt_budget=None, count_tokens=counter)).truncated
    assert counter.calls == 0


@pytest.mark.parametrize("budget", [30, 64, 65, 100, 200, 300])
@pytest.mark.asyncio
async def test_oldest_exchanges_are_dropped_until_the_prompt_fits(budget: int) -> None:
    counter = WordCounter()
    history = exchanges(12)
    fitted = await fit_history("sys", history, "new question", prompt_budget=budget, count_tokens=counter)

    kept = fitted.messages[1:-1]
    assert kept == history[len(history) - len(kept):], "kept turns must be the newest ones, in order"
    assert len(kept) % 2 == 0, "exchanges are dropped whole"
    assert fitted.truncated
    assert counter.tokens(fitted.messages) <= budget
    one_more = build_messages("sys", history[len(history) - len(kept) - 2:], "new question")
    assert counter.tokens(one_more) > budget, "no older exchange would still have fitted"


@pytest.mark.asyncio
async def test_prompt_too_long_even_alone_is_refused() -> None:
    with pytest.raises(APIError) as refused:
        await fit_history(None, exchanges(2), "far too many words here", prompt_budget=4, count_tokens=WordCounter())
    assert refused.value.status == 400
    assert refused.value.code == "context_length_exceeded"
