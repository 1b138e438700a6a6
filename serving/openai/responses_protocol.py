"""Request shapes of OpenAI's Responses API (`POST /v1/responses`), checked at the trust boundary.

The spec is the `openai` package's `types/responses/response_create_params.py` and the input item
types it names (`EasyInputMessageParam`, `ResponseOutputMessageParam`, `ResponseFunctionToolCallParam`,
`FunctionCallOutput`, `FunctionToolParam`, ...). The rule is `protocol.py`'s: every field of the spec
is accepted; the ones the server uses are validated as strictly as chat's; hints that leave the
answer as it is (`metadata`, `user`, `service_tier`, `prompt_cache_key`, `reasoning` of a model that
does not reason, `include` of outputs this server never makes, ...) are accepted and ignored; a value
the server cannot honour (built-in tools such as `web_search`, `background: true`, image, file and
audio inputs, `conversation`, prompt templates, `truncation: "auto"`, ...) is a 400
`unsupported_value` naming the field; unknown fields are dropped and named in the
`x-kilolora-ignored-fields` header.

Input items: messages (role user / system / developer / assistant; content a string or
`input_text` / `output_text` / `refusal` parts, so a previous response's output items can be sent
back as they are), `function_call` items and `function_call_output` items. `responses_api.py` turns
them into the chat messages that `Serving.prepare_chat` takes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from .protocol import MAX_LOGPROBS, MAX_TOKENS, Unsupported, _Request

MAX_ITEMS = 1024
"""input items in one request (chat's limit on messages)"""
LOGPROBS_INCLUDE = "message.output_text.logprobs"
"""the `include` value that asks for the output text's log-probabilities"""


class InputPart(_Request):
    """A part of a message's content: `input_text` (what a user, system or developer wrote),
    `output_text` or `refusal` (an assistant's earlier output, sent back as it came)."""

    type: Literal["input_text", "output_text", "refusal", "input_image", "input_file", "input_audio", "summary_text",
                  "reasoning_text"]
    text: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    """an earlier answer's citations: not part of the prompt"""
    logprobs: list[dict[str, Any]] | None = None
    """an earlier answer's log-probabilities: not part of the prompt"""
    prompt_cache_breakpoint: dict[str, Any] | None = None
    """OpenAI's caching hint: the prefix cache here needs none"""

    @model_validator(mode="after")
    def _check(self) -> InputPart:
        if self.type in ("input_image", "input_file", "input_audio"):
            raise Unsupported(f"content parts of type {self.type!r} are not supported: this model reads text only",
                              "type")
        if self.type in ("summary_text", "reasoning_text"):
            raise Unsupported(f"{self.type!r} parts belong to reasoning items, which this model does not write",
                              "type")
        field = "refusal" if self.type == "refusal" else "text"
        if getattr(self, field) is None:
            raise ValueError(f"a {self.type!r} part needs {field!r}")
        return self

    def chat(self) -> dict:
        """The part as chat's content part."""
        if self.type == "refusal":
            return {"type": "refusal", "refusal": self.refusal}
        return {"type": "text", "text": self.text}


Parts = Annotated[list[InputPart], Field(max_length=MAX_ITEMS)]


class InputMessage(_Request):
    """A message item: `EasyInputMessageParam`, the input `Message`, or a previous response's
    `ResponseOutputMessage` sent back."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Parts
    id: str | None = Field(default=None, max_length=256)
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def chat(self) -> dict:
        c = self.content
        return {"role": self.role, "content": c if isinstance(c, str) else [p.chat() for p in c]}


class FunctionCallItem(_Request):
    """A function call the model made (`ResponseFunctionToolCallParam`), sent back as history."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=128)
    arguments: str = Field(max_length=65536)
    id: str | None = Field(default=None, max_length=256)
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    namespace: str | None = None
    caller: dict[str, Any] | None = None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v):
        if v:
            raise Unsupported("tool namespaces are not supported; declare plain function tools")
        return v

    def tool_call(self) -> dict:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class FunctionCallOutputItem(_Request):
    """The result of a function call (`FunctionCallOutput`): text, or a list of `input_text` parts."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str | Parts
    id: str | None = Field(default=None, max_length=256)
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    name: str | None = None
    namespace: str | None = None
    caller: dict[str, Any] | None = None

    @field_validator("output")
    @classmethod
    def _text_parts(cls, v):
        if isinstance(v, list) and any(p.type != "input_text" for p in v):
            raise ValueError("a function_call_output holds text or input_text parts")
        return v

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class OtherItem(_Request):
    """Every other kind of input item of the spec: built-in tools' calls and outputs, reasoning,
    item references, MCP, ..."""

    type: str = Field(max_length=64)

    @model_validator(mode="after")
    def _refuse(self) -> OtherItem:
        why = {"item_reference": "item references are not supported; send the item itself, or continue a stored "
                                 "response with previous_response_id",
               "reasoning": "reasoning items are not supported: this model does not reason, and its responses "
                            "hold none"}
        raise Unsupported(why.get(self.type, f"input items of type {self.type!r} are not supported; this server "
                                             f"reads messages, function_call and function_call_output items"), "type")


def _item_kind(v) -> str:
    t = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None)
    return {"message": "Message", "function_call": "FunctionCall", "function_call_output": "FunctionCallOutput"}.get(
        t, "Other")  # capitalized tags: protocol.validation_error leaves them out of the field's path


InputItem = Annotated[Union[Annotated[InputMessage, Tag("Message")], Annotated[FunctionCallItem, Tag("FunctionCall")],
                            Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")],
                            Annotated[OtherItem, Tag("Other")]], Discriminator(_item_kind)]


class FunctionTool(_Request):
    """A tool in the Responses' flat shape, `{"type": "function", "name", "parameters", ...}`;
    any other type (a built-in tool) is refused."""

    type: str = Field(max_length=64)
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None
    allowed_callers: list[str] | None = None
    output_schema: dict[str, Any] | None = None
    """describes what the function returns: nothing for the model to honour"""

    @model_validator(mode="after")
    def _check(self) -> FunctionTool:
        if self.type != "function":
            raise Unsupported(f"the tool type {self.type!r} (a built-in or hosted tool) is not available on this "
                              f"server; declare function tools", "type")
        if self.name is None:
            raise ValueError("a function tool needs name")
        if self.defer_loading:
            raise Unsupported("deferred tool loading (tool search) is not supported; send defer_loading false",
                              "defer_loading")
        return self

    def body(self) -> dict:
        """The tool as a response body echoes it."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict}

    def chat(self) -> dict:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters, "strict": self.strict}
        return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


class ToolChoice(_Request):
    """`{"type": "function", "name": ...}`; the other object forms are refused."""

    type: str = Field(max_length=64)
    name: str | None = None
    mode: str | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _check(self) -> ToolChoice:
        if self.type != "function":
            raise Unsupported(f"a tool_choice of type {self.type!r} is not supported; name a function, or send "
                              f"'auto', 'none' or 'required'", "type")
        if self.name is None:
            raise ValueError("a function tool_choice needs name")
        return self


class TextFormat(BaseModel):
    """`text.format`: plain text, or a structured format, which goes to chat's `response_format`
    (constrained decoding, `serving/structured.py`)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def response_format(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        spec = {"name": self.name, "schema": self.json_schema, "description": self.description, "strict": self.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def _verbosity(cls, v):
        if v not in (None, "medium"):
            raise Unsupported("verbosity cannot be constrained by this server; send 'medium' or omit it")
        return v


class ResponsesRequest(_Request):
    """POST /v1/responses"""

    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[InputItem], Field(max_length=MAX_ITEMS)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    include: list[str] | None = Field(default=None, max_length=32)
    """only `message.output_text.logprobs` changes anything: the others ask for outputs of tools and
    reasoning this server never makes"""
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    """`include_obfuscation`: this server pads no events, which clients ignore"""
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=0)
    """a bound on built-in tool calls, of which this server makes none"""
    store: bool | None = None
    """keep the response (in memory, bounded) for `previous_response_id` and `GET /v1/responses/{id}`;
    default true, as OpenAI's"""
    previous_response_id: str | None = Field(default=None, max_length=256)
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # OpenAI's hints that do not change the answer: accepted, ignored
    metadata: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = None
    service_tier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = Field(default=None, max_length=64)
    prompt_cache_options: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    """a reasoning effort or summary, of a model that writes no reasoning: met at every level"""
    image: dict[str, Any] | None = None
    """how images in the context are compressed; there are none"""
    access_programs: dict[str, Any] | None = None
    # OpenAI's fields that ask for what this server does not do: only their neutral values
    background: bool | None = None
    background_options: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None
    moderation: dict[str, Any] | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _null_is_default(cls, v):
        return v if v is not None else False

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        refuse = {"background": (self.background, "background responses are not supported; send background false"),
                  "background_options": (self.background_options, "background responses are not supported"),
                  "conversation": (self.conversation, "conversations are not stored on this server; continue a "
                                                      "stored response with previous_response_id"),
                  "prompt": (self.prompt, "stored prompt templates are not available on this server"),
                  "context_management": (self.context_management, "context compaction is not supported"),
                  "moderation": (self.moderation, "moderation of inputs and outputs is not available on this server")}
        for field, (value, why) in refuse.items():
            if value:
                raise Unsupported(why, field)
        if self.truncation == "auto":
            raise Unsupported("truncation 'auto' (dropping the start of a conversation) is not supported; send "
                              "'disabled'", "truncation")
        return self

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must be a string or a non-empty list of items")
        return v

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])
