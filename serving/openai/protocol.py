"""Request and error shapes of the OpenAI API (completions, chat completions, tool calls), checked
at the trust boundary.

Every field of OpenAI's spec is accepted (the `openai` package's `completion_create_params` is what
the SDK sends). The fields the server uses are validated as strictly as ever. Hints that leave the
output as it is (`store`, `metadata`, `service_tier`, `user`, `prompt_cache_key`, `prediction`,
`reasoning_effort` of a model that does not reason, ...) are accepted and ignored. A value the server
cannot honour (`audio` output, `modalities: ["audio"]`, `web_search_options`, penalties, chat `echo`,
image parts, the deprecated `functions`, ...) is a 400 naming the
field (code `unsupported_value`); so are vLLM's extensions that change the output until the server
implements them (`VLLM_EXTRAS`). Fields outside both are accepted and dropped as vLLM does:
`ignored_fields` lists them (the server logs them and names them in a response header), and being
dropped they never reach a chat template. vLLM's `top_k`, `ignore_eos`,
`include_stop_str_in_output` and `prompt_logprobs` are implemented under vLLM's names, and so are
completions' `echo` and `max_tokens: 0` (what evaluation harnesses send to score a prompt).
Structured outputs (`serving.structured`) come as chat's `response_format` (`json_object`,
`json_schema`) or, on both endpoints, as vLLM's `structured_outputs` / `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` (one per request); a spec that does not compile is a 400 naming
its field (`serving.py`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError, field_validator, model_validator

from ..structured import StructuredOutputsParams

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


class Unsupported(ValueError):
    """A value of OpenAI's (or vLLM's) spec that this server cannot honour: a 400 `unsupported_value`
    naming `field` (below the model that raised it; None: the field being validated)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def validation_error(err: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the field and the value received (one problem: a value the
    server cannot honour first, else the first field's, through the union member that got furthest)."""
    e = _pick(err.errors())
    path = [str(x) for x in e["loc"] if not _is_tag(x)]
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, Unsupported):
        loc = ".".join(path + ([cause.field] if cause.field else []))
        return APIError(400, f"unsupported value for {loc!r}: {cause}", param=loc or None, code="unsupported_value")
    loc = ".".join(path)
    msg = e["msg"].removeprefix("Value error, ")
    if not loc:  # a check across fields (a model validator): no one field to name
        return APIError(400, f"invalid request: {msg}", code="invalid_value")
    got = e.get("input")
    got = repr(got)[:80] if not isinstance(got, dict) else "an object"
    return APIError(400, f"invalid value for {loc!r}: {msg} (got {got})", param=loc, code="invalid_value")


def _pick(errors: list[dict]) -> dict:
    for e in errors:
        if isinstance((e.get("ctx") or {}).get("error"), Unsupported):
            return e
    # A union reports every member's failure, the `str` member's first: the one that went deepest
    # (the list of parts, the named tool choice) says what is wrong.
    first = errors[0]
    return max((e for e in errors if e["loc"][:1] == first["loc"][:1]), key=lambda e: len(e["loc"]))


_FIELD = re.compile(r"[a-z][a-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _is_tag(x) -> bool:
    """A union member's tag in an error's location (`str`, `list[ContentPart]`, `NamedToolChoice`,
    `function-after[...]`), not a field name or an index."""
    return isinstance(x, str) and (x in _TYPE_TAGS or not _FIELD.fullmatch(x))


class _Request(BaseModel):
    """A request body (or a part of one). Fields it does not know are dropped and remembered."""

    model_config = ConfigDict(extra="ignore")
    _ignored: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _note_ignored(cls, data, handler):
        out = handler(data)
        if isinstance(data, dict):
            extra = tuple(str(k) for k in data if k not in cls.model_fields)
            if extra:
                out._ignored = extra
        return out


def ignored_fields(req: BaseModel, at: str = "") -> list[str]:
    """The dotted paths of the fields of `req` (and its parts) that were dropped as unknown."""
    out = [at + k for k in getattr(req, "_ignored", ())]
    for name in type(req).model_fields:
        v = getattr(req, name)
        for i, x in enumerate(v) if isinstance(v, list) else [(None, v)]:
            if isinstance(x, _Request):
                out += ignored_fields(x, f"{at}{name}." + (f"{i}." if i is not None else ""))
    return out


VLLM_EXTRAS: dict[str, tuple] = {
    "bad_words": (None, []), "allowed_token_ids": (None,), "logits_processors": (None, []),
    "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0), "truncate_prompt_tokens": (None,),
    "return_tokens_as_token_ids": (None, False),
}
"""vLLM's extensions that change the output, which this server does not implement (yet): accepted
at a neutral value, refused otherwise (not silently ignored). Drop an entry once it is implemented
(`prompt_logprobs` is a field of `CompletionRequest`)."""
VLLM_CHAT_EXTRAS: dict[str, tuple] = {
    "echo": (None, False), "chat_template": (None,), "documents": (None, []),
}
"""the same for vLLM's chat-only extensions"""
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _structured_params(v: dict) -> StructuredOutputsParams:
    """vLLM's `structured_outputs` object as the engine's spec. Its hints that leave a valid output
    valid (`disable_any_whitespace`, `disable_additional_properties`, `disable_fallback`, a backend)
    are ignored; the ones that change the output and are not implemented are refused."""
    for k in ("structural_tag", "whitespace_pattern"):
        if v.get(k) is not None:
            raise Unsupported(f"structured_outputs.{k} is not supported by this server; send one of "
                              f"{', '.join(_STRUCTURED_KINDS)}", k)
    return StructuredOutputsParams(**{k: v[k] for k in _STRUCTURED_KINDS if v.get(k) is not None and v[k] is not False})


def _neutral(x, values: tuple) -> bool:
    return any(x is v if v is None or isinstance(v, bool) else not isinstance(x, bool) and x == v for v in values)


def _refuse_extras(data, table: dict[str, tuple]):
    if isinstance(data, dict):
        for k, neutral in table.items():
            if k in data and not _neutral(data[k], neutral):
                raise Unsupported(f"{k} (a vLLM extension) is not supported by this server; omit it or send "
                                  f"{neutral[-1]!r}", k)
    return data


class StreamOptions(_Request):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None
    """OpenAI pads chunks against side channels; this server sends no padding, which clients ignore"""


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
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    """an end-user id (OpenAI's abuse tracking): ignored"""
    # vLLM extensions
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    min_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP)
    skip_special_tokens: StrictBool | None = None
    structured_outputs: dict[str, Any] | None = None
    """vLLM's: one of `json` (a JSON schema), `regex`, `choice`, `grammar` (EBNF), `json_object`"""
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    """vLLM's older names of the same (`guided_json` is a schema, ...)"""

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, v):
        if v is not None:
            _structured_params(v)
        return v

    @field_validator("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    @classmethod
    def _guided(cls, v, info):
        if v is not None:
            StructuredOutputsParams(**{info.field_name.removeprefix("guided_"): v})
        return v

    @model_validator(mode="after")
    def _one_structure(self):
        given = [name for name, _ in self.structured_specs()]
        if len(given) > 1:
            raise ValueError(f"structured outputs are asked for by {', '.join(given)}: send one of them")
        return self

    def structured_specs(self) -> list[tuple[str, StructuredOutputsParams]]:
        """(field, spec) for each field that asks for structured outputs."""
        out = [("structured_outputs", _structured_params(self.structured_outputs))] \
            if self.structured_outputs is not None else []
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(self, name) is not None:
                out.append((name, StructuredOutputsParams(**{name.removeprefix("guided_"): getattr(self, name)})))
        return out

    def structured(self) -> tuple[str, StructuredOutputsParams] | None:
        """The request's structured-output spec and the field that asks for it (None: free text)."""
        specs = self.structured_specs()
        return specs[0] if specs else None

    @model_validator(mode="before")
    @classmethod
    def _vllm_extras(cls, data):
        return _refuse_extras(data, VLLM_EXTRAS)

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        return v if v is not None else cls.model_fields[info.field_name].default

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

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v and any(t < 0 or t >= 2**31 for t in v):
            raise ValueError("stop_token_ids must be token ids (0 <= id < 2**31)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v:
            raise Unsupported("logit_bias is not supported by this server; send {} or omit it")
        return v


class CompletionRequest(_Sampling):
    """POST /v1/completions. With `echo` the prompt comes back before the completion (and with
    `logprobs`, the prompt's tokens scored first: the first one has none); `max_tokens: 0` (only with
    echo) generates nothing. vLLM's `prompt_logprobs: k` adds each choice's `prompt_logprobs`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    """0 only with echo: the prompt alone (scored, with logprobs)"""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = Field(default=None, ge=-1, le=MAX_LOGPROBS)
    """vLLM's: each prompt token's log-probability, rank and the k most likely tokens"""

    @field_validator("echo", mode="before")
    @classmethod
    def _echo(cls, v):
        return v if v is not None else False

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs(cls, v):
        if v == -1:
            raise Unsupported(f"prompt_logprobs -1 (the whole vocabulary) is not supported; ask for at most "
                              f"{MAX_LOGPROBS}")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise Unsupported("suffix (text after the insertion) is not supported by this server")
        return v

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("best_of is not supported (it must equal n or be omitted)", "best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo (the prompt, scored with logprobs)")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available when stream is true (as in vLLM)")
        return self

    @property
    def prompt_top(self) -> int | None:
        """How many alternatives each prompt token needs (None: the prompt is not scored). vLLM's
        `prompt_logprobs` defaults to `logprobs` under echo."""
        ks = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(ks) if ks else None

    @property
    def prompt_logprobs_k(self) -> int | None:
        """The k of each choice's `prompt_logprobs` (None: no such field)."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

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
    type: Literal["function", "custom"] = "function"
    function: FunctionCall | None = None

    @model_validator(mode="after")
    def _check(self) -> ToolCall:
        if self.type == "custom":
            raise Unsupported("custom tool calls are not supported; this server calls function tools", "type")
        if self.function is None:
            raise ValueError("a function tool call needs function")
        return self


class ContentPart(_Request):
    """A part of a message's content: text, or an assistant's refusal. The other kinds of OpenAI's
    spec (images, audio, files) need a model that reads them."""

    type: Literal["text", "refusal", "image_url", "input_audio", "file"]
    text: str | None = None
    refusal: str | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None
    """OpenAI's caching hint: the prefix cache here needs none"""

    @model_validator(mode="after")
    def _check(self) -> ContentPart:
        if self.type not in ("text", "refusal"):
            raise Unsupported(f"content parts of type {self.type!r} are not supported: this model reads text only",
                              "type")
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} part needs {self.type!r}")
        return self

    @property
    def value(self) -> str:
        return self.text if self.type == "text" else self.refusal


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=128)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=128)
    refusal: str | None = None
    """an assistant's refusal (the SDK's `message.model_dump()` carries it, null): the turn's text
    when it has no content"""
    annotations: list[dict[str, Any]] | None = None
    """an answer's citations (the SDK's round trip carries them): not part of the prompt"""
    audio: dict[str, Any] | None = None
    """a previous audio answer"""
    function_call: dict[str, Any] | None = None
    """the deprecated form of tool_calls"""

    @model_validator(mode="after")
    def _check(self) -> Message:
        if self.role == "function":
            raise Unsupported("function messages (the deprecated function-calling API) are not supported; answer "
                              "tool_calls with tool messages", "role")
        if self.audio is not None:
            raise Unsupported("audio is not supported: this server reads and writes text only", "audio")
        if self.function_call is not None:
            raise Unsupported("function_call (deprecated) is not supported; send tool_calls", "function_call")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role != "assistant" and any(p.type == "refusal" for p in self.content or [] if not isinstance(p, str)):
            raise ValueError("only assistant messages carry refusal parts")
        if self.content is None and not self.tool_calls and (self.role != "assistant" or self.refusal is None):
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        c = self.content
        if c is None:
            return self.refusal if self.role == "assistant" and self.refusal is not None else ""
        return c if isinstance(c, str) else "".join(p.value for p in c)


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function", "custom"]
    function: FunctionDef | None = None

    @model_validator(mode="after")
    def _check(self) -> ToolDef:
        if self.type == "custom":
            raise Unsupported("custom tools (free-form input) are not supported; declare function tools", "type")
        if self.function is None:
            raise ValueError("a function tool needs function")
        return self


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function", "custom", "allowed_tools"]
    function: NamedFunction | None = None

    @model_validator(mode="after")
    def _check(self) -> NamedToolChoice:
        if self.type != "function":
            raise Unsupported(f"a tool_choice of type {self.type!r} is not supported; name a function, or send "
                              f"'auto', 'none' or 'required'", "type")
        if self.function is None:
            raise ValueError("a function tool_choice needs function")
        return self


class ResponseFormat(_Request):
    """`text`; `json_object`: any JSON object; `json_schema` ({name, description, schema, strict}): the
    output validates against `schema` (enforced whatever `strict` says)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        self.spec()  # a schema missing, not a schema or too large: a 400 naming response_format
        return self

    def spec(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None or "schema" not in self.json_schema:
            raise ValueError("a json_schema response_format needs json_schema.schema (the JSON schema)")
        try:
            return StructuredOutputsParams(json=self.json_schema["schema"])
        except ValueError as err:
            raise ValueError(f"json_schema.schema: {err}") from None


class Prediction(_Request):
    """Predicted Outputs: a hint that only speeds generation up, so ignoring it leaves the answer as is"""

    type: Literal["content"]
    content: str | list[ContentPart]


class ChatRequest(_Sampling):
    """POST /v1/chat/completions"""

    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # vLLM's chat-template controls
    add_generation_prompt: bool = True
    """open the assistant's turn after the messages (the template's `add_generation_prompt`)"""
    continue_final_message: bool = False
    """continue the last message (an assistant's prefix) instead of opening a new turn"""
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=32)
    """extra variables of the chat template (e.g. `enable_thinking`); see `check_template_kwargs`"""
    # OpenAI's hints that do not change the answer: accepted, ignored
    store: bool | None = None
    """nothing here reads stored completions back"""
    metadata: dict[str, Any] | None = None
    service_tier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = Field(default=None, max_length=64)
    prompt_cache_options: dict[str, Any] | None = None
    """the prefix cache here is automatic"""
    safety_identifier: str | None = None
    reasoning_effort: str | None = Field(default=None, max_length=64)
    """a bound on reasoning tokens, which this model does not write: met at every level"""
    prediction: Prediction | None = None
    # OpenAI's fields that ask for what this server does not do: only their neutral values
    audio: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    moderation: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _vllm_chat_extras(cls, data):
        return _refuse_extras(data, VLLM_CHAT_EXTRAS)

    @model_validator(mode="after")
    def _check(self) -> ChatRequest:
        self._refuse_unsupported()
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
        check_template_controls(self)
        ids = [c.id for m in self.messages for c in m.tool_calls or []]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup is not None:
            raise ValueError(f"tool call ids must be unique in a conversation; {dup!r} appears {ids.count(dup)} times")
        return self

    def _refuse_unsupported(self) -> None:
        if self.audio is not None or "audio" in (self.modalities or []):
            raise Unsupported("audio output is not supported: this server writes text only",
                              "audio" if self.audio is not None else "modalities")
        for field, what in (("moderation", "moderation of inputs and outputs"), ("web_search_options", "web search")):
            if getattr(self, field) is not None:
                raise Unsupported(f"{what} is not available on this server", field)
        if self.verbosity not in (None, "medium"):
            raise Unsupported("verbosity cannot be constrained by this server; send 'medium' or omit it", "verbosity")
        if self.functions:
            raise Unsupported("functions (deprecated) are not supported; declare them as tools", "functions")
        if self.function_call not in (None, "none", "auto"):
            raise Unsupported("function_call (deprecated) is not supported; use tool_choice", "function_call")
        if self.prediction is not None and (self.n > 1 or self.logprobs):
            raise Unsupported("prediction cannot be combined with n > 1 or logprobs (as in OpenAI's API)", "prediction")

    def structured_specs(self) -> list[tuple[str, StructuredOutputsParams]]:
        own = self.response_format.spec() if self.response_format is not None else None
        return ([("response_format", own)] if own is not None else []) + super().structured_specs()

    @property
    def choice(self) -> str:
        """`none`, `auto`, `required`, or the name of the function the model must call."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "function:" + self.tool_choice.function.name
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


TEMPLATE_RESERVED = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
    "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "chat_template", "raise_exception", "strftime_now"})
"""names `chat_template_kwargs` cannot set: `apply_chat_template`'s own arguments and the globals
it gives the template; names ending in `_token` / `_tokens` are refused too (`bos_token`, ...: the
tokenizer's special tokens, which a client must not redefine)"""
_TEMPLATE_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_template_controls(req) -> None:
    """vLLM's rules for `add_generation_prompt` / `continue_final_message` (not both), and the
    names of `chat_template_kwargs` (template variables; not ones that `TEMPLATE_RESERVED` covers).
    Their string values are checked for markup with the messages (`Serving.check_contents`)."""
    if req.continue_final_message and req.add_generation_prompt:
        raise ValueError("cannot set both continue_final_message and add_generation_prompt to true "
                         "(send add_generation_prompt: false to continue the last message)")
    if req.continue_final_message and req.messages and req.messages[-1].role != "assistant":
        raise ValueError(f"continue_final_message continues the last message, which must be the assistant's "
                         f"(it is {req.messages[-1].role!r})")
    for k in getattr(req, "chat_template_kwargs", None) or {}:
        if not _TEMPLATE_VAR.match(k):
            raise ValueError(f"chat_template_kwargs: {k[:64]!r} is not a template variable name")
        if k in TEMPLATE_RESERVED or k.endswith(("_token", "_tokens")):
            raise ValueError(f"chat_template_kwargs cannot set {k!r} (the server sets it)")


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
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=32)
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        if self.messages is not None:
            check_template_controls(self)
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
