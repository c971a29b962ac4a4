"""Request bodies of the OpenAI-compatible API, checked strictly (a string is not a number): a bad field is a 400
naming it. Fields OpenAI has and this server does not implement are refused by name rather than ignored."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Probability = Annotated[float, Field(gt=0, le=1)]
Temperature = Annotated[float, Field(ge=0, le=2)]
Stop = str | Annotated[list[str], Field(max_length=4)]

# OpenAI fields this server refuses when set to anything but their default.
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # other OpenAI fields (user, metadata...) pass


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: int | None = None
    memory: str | None = None
    ignore_eos: bool = False  # generate through EOS (vLLM's extension): for benchmarks and tests
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None  # only 0 (no penalty) is implemented
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None


class MemoryBody(_Body):
    text: str
    template: str | None = None
    system: str | None = None
