"""What the JSON endpoints accept: the request bodies (pydantic), and reading them - JSON only
(``Content-Type: application/json``, else 415), at most ``--max-body-bytes`` (else 413),
validation errors as 400s in OpenAI's shape (never 422)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .requests import ServeError
from .security import require_json


# -- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # like most OpenAI-compatible servers: unknown fields are ignored


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class Generation(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    temperature: float | None = Field(None, ge=0, le=2)  # ignored: greedy
    top_p: float | None = Field(None, ge=0, le=1)  # ignored: greedy
    seed: int | None = None  # ignored: greedy is deterministic
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (as in vLLM): always generate max_tokens tokens


class ChatRequest(Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None


class CompletionRequest(Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class AdapterRequest(_Body):
    name: str
    path: str


# -- helpers ----------------------------------------------------------------------------------------
def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return f"invalid request body: {loc or 'body'}: {err.get('msg')}", (str(err["loc"][0]) if err.get("loc") else None)


def parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise ServeError(400, msg, "invalid_value", param) from None


async def read_json(request: Any, limit: int) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes (413) before reading it all, and
    anything not sent as ``application/json`` (415) before reading any of it."""
    require_json(request.headers.get("content-type"))
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > limit
        except ValueError:
            raise ServeError(400, "invalid Content-Length header", "invalid_value") from None
        if too_big:
            raise ServeError(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes "
                                  "(--max-body-bytes)", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)",
                             "request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError) as e:
        raise ServeError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
