"""Request and error shapes of the OpenAI API (completions, chat completions, tool calls), checked
at the trust boundary.

Requests are pydantic models that forbid unknown fields, so a misspelt or unsupported parameter is
a 400 naming it rather than silently ignored. Parameters OpenAI defines but this server does not
implement (penalties, `logit_bias`, `echo`, `suffix`, `best_of`) are accepted only at their neutral
values. A few vLLM extensions are accepted under vLLM's names (`top_k`, `ignore_eos`,
`include_stop_str_in_output`), so clients written for vLLM work unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16
MAX_STOP = 4
MAX_LOGPROBS = 20
MAX_PROMPTS = 256
"""prompts in one completions request (and each counts n sequences against the in-flight limit)"""
MAX_TOKENS = 1 << 20
MAX_TOP_K = 2**31 - 1
"""a top_k at or over the vocabulary keeps every token"""


class APIError(Exception):
    """An error the server answers with OpenAI's error body and `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field and the value received."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if not (isinstance(x, str) and x in _UNION_TAGS))
    if e["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {loc}", param=loc, code="unrecognized_argument")
    msg = e["msg"].removeprefix("Value error, ")
    if not loc:  # a check across fields (a model validator): no one field to name
        return APIError(400, f"invalid request: {msg}", code="invalid_value")
    got = e.get("input")
    got = repr(got)[:80] if not isinstance(got, dict) else "an object"
    return APIError(400, f"invalid value for {loc!r}: {msg} (got {got})", param=loc, code="invalid_value")


_UNION_TAGS = {"str", "list[str]", "list[int]", "list[list[int]]", "function-after[_check(), Message]", "int", "none"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    """below sampling.GREEDY_EPS (1e-5) it is greedy"""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """a top_p too small for float32 keeps the most likely token alone"""
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    # vLLM extensions
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop sequences must be 1 to 256 characters")
        return stops

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("penalties are not supported by this server; send 0 or omit the field")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v


class CompletionRequest(_Sampling):
    """POST /v1/completions"""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n or be omitted)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and v and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class FunctionCall(_Request):
    name: str = Field(min_length=1, max_length=128)
    arguments: str = Field(max_length=65536)


class ToolCall(_Request):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=128)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _check(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not self.tool_calls:
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        c = self.content
        if c is None:
            return ""
        return c if isinstance(c, str) else "".join(p.text for p in c)


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatRequest(_Sampling):
    """POST /v1/chat/completions"""

    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send one")
            self.max_tokens = self.max_completion_tokens
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools {names}")
        if self.tool_choice in ("required",) and not names:
            raise ValueError("tool_choice 'required' needs tools")
        ids = [c.id for m in self.messages for c in m.tool_calls or []]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup is not None:
            raise ValueError(f"tool call ids must be unique in a conversation; {dup!r} appears {ids.count(dup)} times")
        return self

    @property
    def choice(self) -> str:
        """`none`, `auto`, `required`, or the name of the function the model must call."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "function:" + self.tool_choice.function.name
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


class LoadLoraRequest(_Request):
    """POST /v1/load_lora_adapter (vLLM's body)"""

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-/]+$")
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False

    @field_validator("lora_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("lora_path must not hold NUL characters")
        long = next((c for c in v.split("/") if len(c.encode("utf-8", "surrogatepass")) > 255), None)
        if long is not None:
            raise ValueError(f"lora_path has a component of {len(long)} characters; file names have at most 255")
        return v


class UnloadLoraRequest(_Request):
    """POST /v1/unload_lora_adapter (vLLM's body)"""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's body): a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
