"""Fitting a conversation's earlier turns into the model's context window.

The engine refuses a prompt that leaves no room for `max_tokens`, so a long
conversation would stop working once it outgrew the context. Instead the
oldest exchanges (a user turn and its reply, never half of one) are left out
until the prompt fits, and the reply says so. Counts come from the engine's
own tokenizer and chat template, so the fit is exact: one count when
everything fits (the common case), a binary search over how many exchanges to
drop otherwise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from app.errors import APIError
from app.generate.engine import ChatMessage

TokenCounter = Callable[[list[ChatMessage]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    messages: list[ChatMessage]
    dropped_exchanges: int

    @property
    def truncated(self) -> bool:
        return self.dropped_exchanges > 0


def build_messages(system: str | None, history: Sequence[ChatMessage], user_text: str) -> list[ChatMessage]:
    """System prompt first, then the earlier turns in order, then the new user message."""
    messages: list[ChatMessage] = [{"role": "system", "content": system}] if system else []
    messages.extend(history)
    messages.append({"role": "user", "content": user_text})
    return messages


async def fit_history(
    system: str | None,
    history: Sequence[ChatMessage],
    user_text: str,
    prompt_budget: int | None,
    count_tokens: TokenCounter,
) -> FittedPrompt:
    """Keep the newest exchanges of `history` whose prompt fits in `prompt_budget` tokens.

    `history` holds whole exchanges (user, assistant, user, assistant, ...).
    Without history or without a known budget nothing is counted: the engine
    itself refuses a prompt that is too long on its own.
    """
    exchanges = len(history) // 2

    def with_dropped(dropped: int) -> list[ChatMessage]:
        return build_messages(system, history[2 * dropped:], user_text)

    if prompt_budget is None or exchanges == 0:
        return FittedPrompt(with_dropped(0), 0)
    if await count_tokens(with_dropped(0)) <= prompt_budget:
        return FittedPrompt(with_dropped(0), 0)
    alone = await count_tokens(with_dropped(exchanges))
    if alone > prompt_budget:
        raise APIError(
            400,
            f"The prompt takes {alone} tokens, more than the {prompt_budget} the context leaves next to "
            "max_tokens, even without earlier turns: shorten the prompt or the system prompt, or lower max_tokens.",
            param="prompt",
            code="context_length_exceeded",
        )
    # Invariant: dropping `fits` exchanges fits, dropping `too_long` does not.
    too_long, fits = 0, exchanges
    while fits - too_long > 1:
        middle = (too_long + fits) // 2
        if await count_tokens(with_dropped(middle)) <= prompt_budget:
            fits = middle
        else:
            too_long = middle
    return FittedPrompt(with_dropped(fits), fits)
