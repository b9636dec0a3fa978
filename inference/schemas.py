"""Request and response bodies of the public API, one pydantic model each (the admin API's
are the wire contracts in :mod:`loramux.contracts`).

Field constraints make bad input a 422 with a reason before any handler runs. Limits that
depend on settings (prompt tokens, max_new_tokens) are checked in the handlers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

StopField = Annotated[
    str | list[Annotated[str, Field(min_length=1, max_length=128)]] | None,
    Field(description="Stop strings (at most 8); the text is cut before the first one."),
]


def _normalise_stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > 8:
        raise ValueError("at most 8 stop strings")
    if any(not s or len(s) > 128 for s in stops):
        raise ValueError("stop strings must be 1 to 128 characters")
    return stops


class _SamplingFields(BaseModel):
    """The sampling fields both APIs share (the temperature's default differs)."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopField = None
    stream: bool = False
    ignore_eos: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return _normalise_stop(v)


class GenerateRequest(_SamplingFields):
    model_config = ConfigDict(extra="forbid")

    tenant_id: str = Field(min_length=1, max_length=160, description="tenant or tenant@version")
    prompt: str = Field(min_length=1, max_length=200_000)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    tenant_id: str
    version: str | None
    adapter: str | None = Field(description="tenant@version that served it; null = base model")
    text: str
    finish_reason: str
    usage: Usage


class _OpenAIBase(_SamplingFields):
    # OpenAI clients send many optional fields; unknown ones are ignored, as OpenAI does.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=160)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = Field(
        None, max_length=256, description="OpenAI's end-user id; during a canary it is the "
        "split key (unless X-Loramux-Split-Key is sent), so one user sticks to one version")


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] = Field(description="one prompt (a list of exactly one is accepted)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v or len(v) > 200_000:
            raise ValueError("prompt must be 1 to 200000 characters")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
