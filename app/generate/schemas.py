"""Request and reply bodies of `/generate` and `/conversations`.

Typed pydantic models so that bad input is refused before any engine work,
with a message naming the field, and so that the OpenAPI page documents the
simple-client API field by field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

DEFAULT_MAX_TOKENS = 512


class GenerateRequest(BaseModel):
    # Strict: "5" is not a number and "yes" is not a boolean; unknown fields are
    # refused so a typo such as `max_token` does not pass silently.
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(
        None,
        min_length=1,
        description="The model to answer (a name /v1/models lists); needed when the server serves several (MODELS).",
    )
    prompt: str | None = Field(None, min_length=1, description="The user's message (or use `message`).")
    message: str | None = Field(None, min_length=1, description="Same as `prompt`; send exactly one of the two.")
    conversation_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Continue this conversation; omit it to start a new one (its id comes back in the reply).",
    )
    system: str | None = Field(
        None, description="System prompt; kept with the conversation and used for its later turns."
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description=f"Most tokens to generate (default: {DEFAULT_MAX_TOKENS}, at most half the context); "
        "lowered to MAX_TOKENS_CAP when above it.",
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature (0: greedy).")
    stream: bool = Field(False, description="Send the reply as server-sent events while it is generated.")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.message is None):
            raise ValueError("send exactly one of 'prompt' or 'message' (a non-empty string)")
        return self

    @property
    def user_text(self) -> str:
        return self.prompt if self.prompt is not None else str(self.message)


class ModelInfo(BaseModel):
    name: str = Field(description="Served model name (what `/v1` clients send as `model`).")
    max_model_len: int | None = Field(description="Context length in tokens, when the engine reported it.")


class GenerateResponse(BaseModel):
    response: str = Field(description="The generated text.")
    conversation_id: str | None = Field(description="Send it back to continue; null when storage is off.")
    model_info: ModelInfo
    finish_reason: str | None = Field(description="`stop`, or `length` when max_tokens cut the reply.")
    total_ms: float = Field(description="Request received to reply complete (includes history handling).")
    ttft_ms: float | None = Field(description="Request received to the first generated text.")
    generation_ms: float = Field(description="Engine call: request sent to the last token.")
    prompt_tokens: int | None = Field(description="Tokens of the prompt as sent, history included.")
    tokens_generated: int | None = Field(description="Completion tokens, as the engine counted them.")
    tokens_per_second: float | None = Field(description="tokens_generated over generation_ms.")
    response_json: JsonValue = Field(
        description="The reply parsed as a JSON object or array (also inside a ```json fence), else null."
    )
    response_is_json: bool
    max_tokens: int = Field(description="The max_tokens that was used.")
    max_tokens_clamped: bool = Field(description="True when the requested max_tokens was above MAX_TOKENS_CAP.")
    history_truncated: bool = Field(description="True when the oldest turns were left out to fit the context.")


class TurnOut(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    created: float = Field(description="Unix time in seconds.")


class ConversationSummaryOut(BaseModel):
    id: str
    created: float = Field(description="Unix time in seconds.")
    updated: float = Field(description="Unix time in seconds of the last turn.")
    turn_count: int = Field(description="Messages stored (each exchange adds a user and an assistant turn).")


class ConversationListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConversationSummaryOut]


class ConversationOut(ConversationSummaryOut):
    system: str | None
    turns: list[TurnOut]


class ConversationDeletedOut(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True
