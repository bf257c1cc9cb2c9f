"""The validated request layer: one pydantic model per endpoint, built from pieces that OpenAI and KServe v2 share
where they mean the same thing (texts, sampling parameters). A body is parsed and validated before any model code
runs; a wrong type or range is a BadInput (400) naming the field, a request bigger than the server's limits a
TooLarge (413). Strict: no string-to-number coercion, no booleans as numbers, no floats as integers, nothing
non-finite (`1e400` parses to inf, `NaN` to nan)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      ValidationInfo, model_validator)
from pydantic_core import PydanticCustomError

from modeldeploy.serve.errors import BadInput, TooLarge

MAX_STOPS = 4


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (`modeldeploy serve` flags)."""
    max_inputs: int = 1024            # texts per request
    max_new_tokens: int = 4096        # the largest max_tokens
    max_body_bytes: int = 4 * 2**20
    request_timeout: float = 120.0    # seconds, arrival to the last byte


@dataclass(frozen=True)
class Context:
    """The validation context: the limits, and what the served model decides (its embedding size)."""
    limits: Limits
    dimensions: int | None = None


# Error types answered 413 rather than 400: the request is too big, not wrong.
TOO_LARGE = {"too_many_inputs"}


def _texts(value: Any, info: ValidationInfo) -> Any:
    """A string is one text. Counted before the items are looked at, so two million of them cost one len()."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("texts_type", "must be a string or a list of strings")
    if not value:
        raise PydanticCustomError("texts_empty", "must not be empty")
    limit = info.context.limits.max_inputs
    if len(value) > limit:
        raise PydanticCustomError("too_many_inputs", "{count} texts; this server takes at most {limit} per request",
                                  {"count": len(value), "limit": limit})
    return value


def _not_blank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("blank_text", "is empty")
    return text


def _within_limit(value: int | None, info: ValidationInfo) -> int | None:
    limit = info.context.limits.max_new_tokens
    if value is not None and value > limit:
        raise PydanticCustomError("max_tokens_limit", "must be at most {limit} on this server", {"limit": limit})
    return value


def _fits_the_model(value: int | None, info: ValidationInfo) -> int | None:
    size = info.context.dimensions
    if value is not None and size is not None and value > size:
        raise PydanticCustomError("dimensions_range", "must be at most {size} for this model", {"size": size})
    return value


def _content_parts(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise PydanticCustomError("content_type", "must be a string or a list of text parts")
    return value


def _one_or_many(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


Text = Annotated[str, AfterValidator(_not_blank)]
Texts = Annotated[list[Text], BeforeValidator(_texts)]
MaxTokens = Annotated[int | None, Field(ge=1), AfterValidator(_within_limit)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
# OpenAI's meaning everywhere: a string is one stop string.
Stops = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_one_or_many), Field(max_length=MAX_STOPS)]


class Strict(BaseModel):
    # Unknown fields are ignored, as the OpenAI and KServe servers do: clients send more than any server uses.
    model_config = ConfigDict(strict=True, extra="ignore")


class Sampling(Strict):
    max_tokens: MaxTokens = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: Stops = []

    def options(self, default_max_tokens: int) -> dict:
        """The engine's generation options."""
        return {"max_new_tokens": self.max_tokens or default_max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "stop": self.stop}


# -- OpenAI ---------------------------------------------------------------------------------------------------------
class OpenAIRequest(Strict):
    model: str | None = None


class EmbeddingsRequest(OpenAIRequest):
    input: Texts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1), AfterValidator(_fits_the_model)] = None


class ClassifyRequest(OpenAIRequest):
    input: Texts


class Generating(OpenAIRequest, Sampling):
    stream: bool = False
    n: Literal[1] = 1


class CompletionRequest(Generating):
    prompt: Annotated[Texts, Field(max_length=1, description="one prompt per request")]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[list[TextPart], BeforeValidator(_content_parts)]

    def text(self) -> dict:
        return {"role": self.role, "content": "".join(part.text for part in self.content)}


class ChatRequest(Generating):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens = None

    def options(self, default_max_tokens: int) -> dict:
        # OpenAI's newer name wins over max_tokens when both are sent.
        return super().options(default_max_tokens) | (
            {"max_new_tokens": self.max_completion_tokens} if self.max_completion_tokens else {})


# -- KServe Open Inference Protocol v2 (the shape of KServe's v2_datamodels) -----------------------------------------
class V2Parameters(Sampling):
    temperature: Temperature = 0.0


class V2Input(Strict):
    name: str
    datatype: Literal["BYTES"]
    shape: list[int] | None = None
    data: Texts

    @model_validator(mode="after")
    def _shape_fits(self) -> "V2Input":
        if self.shape is not None and self.shape != [len(self.data)]:
            raise PydanticCustomError("shape_mismatch", "shape {shape} does not match its {count} elements",
                                      {"shape": self.shape, "count": len(self.data)})
        return self


class InferenceRequest(Strict):
    id: str | None = None
    parameters: V2Parameters | None = None
    inputs: Annotated[list[V2Input], Field(min_length=1, max_length=1,
                                           description="exactly one tensor: the texts (BYTES)")]


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: bytes, context: Context) -> M:
    """The body as a validated `model`, or the first problem as an error naming its field."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise BadInput(f"the request body is not valid JSON: {error}") from None
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        location = field_path(first["loc"])
        if not location:
            raise BadInput(f"the request body must be a JSON object ({first['msg']})") from None
        error_class = TooLarge if first["type"] in TOO_LARGE else BadInput
        raise error_class(f"{location}: {first['msg']}", param=str(first["loc"][0])) from None


def field_path(loc: tuple) -> str:
    """('inputs', 0, 'data', 2) -> 'inputs[0].data[2]'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
