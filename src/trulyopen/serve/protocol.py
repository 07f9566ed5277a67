"""The OpenAI API's request bodies and error format, as far as this server implements them.

Requests are validated here, strictly (no coercion of "16" to 16), so a bad field gets a 400 that
names it (`param`), as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INT64 = 2**63  # OpenAI's seed is an int64; torch's generators take that range too


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # (always: the answer is decoded under the schema's grammar)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not implement (user, ...) are ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # (not OpenAI's; vLLM's extension)
    # (vLLM's extension) bounded: a penalty near 0 or very large turns logits into inf, and NaN
    # probabilities would fail the engine's whole batch, not just this request
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100.0)
    ignore_eos: bool = False  # (vLLM's extension) run to max_tokens: for benchmarks
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    n: int = Field(default=1, ge=1, le=16)  # choices; with a seed, choice i samples with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wanted_logprobs(self) -> int | None:
        """None: no log-probabilities; k: each token's, with the k most likely alternatives."""
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[Annotated[int, Field(ge=0)]]  # token ids: the server checks the vocabulary's end
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API's: how many alternatives

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str  # a data URL, a local path, or http(s) (fetched only with serve --allow-image-urls)
    detail: str | None = None  # (not read)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other kinds of parts: not read
    type: str
    text: str = ""
    image_url: ImageURL | str | None = None  # OpenAI's image part: {"type": "image_url", ...}
    image: str | None = None  # Hugging Face's: {"type": "image", "image": PATH | data URL}

    def is_image(self) -> bool:
        return self.type in ("image", "image_url")


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None  # None: an assistant turn of tool calls only
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # a `tool` turn: the call it answers

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content if part.type == "text")

    def image_parts(self) -> list[int]:
        """The indices of the content's image parts."""
        if self.content is None or isinstance(self.content, str):
            return []
        return [j for j, part in enumerate(self.content) if part.is_image()]


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict  # a JSON schema of the arguments object
    strict: bool | None = None  # (always: a required call is decoded under its schema's grammar)


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    # auto (the default with tools): the model decides; required: some tool; a named function: that
    # one; none: text only. A required or named call is decoded under the tool's argument schema.
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # (one call per answer when constrained)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    # a text, texts, token ids, or lists of token ids (the server checks the vocabulary's end)
    input: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)  # only the model's own width is served


class TraceRequest(BaseModel):
    """POST /v1/trace (ours, not OpenAI's): the spans of `text` found verbatim in the training data."""

    model_config = ConfigDict(extra="forbid")
    text: str
    min_len: int = Field(default=8, ge=1, description="Shortest span, in tokens.")
    keep: float = Field(default=0.05, gt=0.0, le=1.0, description="Spans kept, a share of the tokens.")
    docs_per_span: int = Field(default=3, ge=1, le=20)
    context_tokens: int = Field(default=40, ge=0, le=500)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error this server answers (for the OpenAPI schema)."""

    error: ErrorDetail


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse(cls: type[BaseModel], raw: bytes) -> BaseModel:
    import json

    def no_constant(name: str):
        raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; JSON has neither

    def number(text: str) -> float | int:
        # JSON has one kind of number: 1.0 is the integer 1 (JSON Schema says so too, and
        # schema-driven clients send it so), while strict validation below would refuse it for n
        x = float(text)
        return int(x) if x.is_integer() and abs(x) < 2**63 else x

    try:
        data = json.loads(raw, parse_constant=no_constant, parse_float=number)
    # ValueError: bad JSON or UTF-8, NaN, an integer of over 4300 digits; RecursionError: deep nesting
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        # strict, as OpenAI's API: "16" is no integer and 0 no boolean (lax mode would take both)
        return cls.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None  # None: the body as a whole
        message = f"{param}: {first['msg']}" if param else first["msg"].removeprefix("Value error, ")
        raise APIError(400, message, param=param, code="invalid_value") from None
