"""OpenAI's Responses API (`/v1/responses`) over the chat path: a request's instructions, stored
history and input items become the chat messages and tools that `Serving.prepare_chat` takes, so
adapters, tool formats (hermes, the world's markup), the forged-markup checks and every bound of
chat apply as they are; the chat choice comes back as the Responses' output items (a `message` with
one `output_text` part, then a `function_call` item per call), whole or as the streamed events.

    instructions               a system message before everything else (not carried over by
                               previous_response_id, as in OpenAI's API)
    previous_response_id       the stored conversation of that response (its input and output)
    input                      a string (one user message) or items: messages, function_call items
                               (an assistant's tool calls; consecutive ones, and one after an
                               assistant message, make one assistant turn), function_call_output
                               items (tool messages)

Stored responses live in this server's memory only (`ResponseStore`): at most
`StoreLimits.max_responses` of them and `StoreLimits.max_bytes` of their JSON, the least recently
used evicted first. A response stored is whole: its body (for `GET /v1/responses/{id}`) and its
conversation (for `previous_response_id`). An unknown or evicted id is a 400
`previous_response_not_found` as a previous response, a 404 on GET and DELETE (OpenAI's codes).

Reference: the `openai` package's `types/responses` (the SDK parses what it gets, so its types are
the spec: `Response`, `ResponseStreamEvent`, ...), vLLM's `serving_responses.py`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from ..sampling import TokenLogprob
from .protocol import APIError, ChatRequest, validation_error
from .responses import Choice, chat_logprobs, created
from .responses_protocol import FunctionCallItem, FunctionCallOutputItem, InputMessage, ResponsesRequest, ToolChoice
from .serving import Prepared, Serving
from .tool_formats import HermesTools

log = logging.getLogger("kilolora.server")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- requests -> chat
@dataclass
class Conversation:
    """A request's chat messages, and where each came from (`instructions`, `previous_response_id`,
    `input` or `input.N`): errors about a message name the field the client sent."""

    messages: list[dict]
    sources: list[str]

    def history(self) -> list[dict]:
        """What `previous_response_id` carries on: every message but the instructions."""
        return [m for m, s in zip(self.messages, self.sources) if s != "instructions"]


def conversation(req: ResponsesRequest, history: list[dict]) -> Conversation:
    out = Conversation([], [])

    def add(m: dict, source: str) -> None:
        out.messages.append(m)
        out.sources.append(source)

    if req.instructions is not None:
        add({"role": "system", "content": req.instructions}, "instructions")
    for m in history:
        add(m, "previous_response_id")
    if isinstance(req.input, str):
        add({"role": "user", "content": req.input}, "input")
        return out
    for i, item in enumerate(req.input):
        if isinstance(item, InputMessage):
            add(item.chat(), f"input.{i}")
        elif isinstance(item, FunctionCallItem):
            last = out.messages[-1] if out.messages else None
            if last is not None and last["role"] == "assistant":  # the same assistant turn: a copy (history is shared)
                out.messages[-1] = {**last, "tool_calls": [*(last.get("tool_calls") or []), item.tool_call()]}
            else:
                add({"role": "assistant", "content": None, "tool_calls": [item.tool_call()]}, f"input.{i}")
        elif isinstance(item, FunctionCallOutputItem):
            add({"role": "tool", "tool_call_id": item.call_id, "content": item.text}, f"input.{i}")
        else:  # pragma: no cover - the other item kinds are refused when the request is read
            raise AssertionError(type(item))
    return out


def chat_request(req: ResponsesRequest, conv: Conversation) -> ChatRequest:
    """The chat completion request that answers `req` (its checks, relabelled to `req`'s fields)."""
    choice = req.tool_choice
    fmt = req.text.format if req.text is not None else None
    body = {"model": req.model, "messages": conv.messages, "max_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p,
            "tools": [t.chat() for t in req.tools] if req.tools else None,
            "tool_choice": {"type": "function", "function": {"name": choice.name}} if isinstance(choice, ToolChoice)
            else choice,
            "parallel_tool_calls": req.parallel_tool_calls, "logprobs": req.logprobs,
            "top_logprobs": (req.top_logprobs or 0) if req.logprobs else None,
            "response_format": fmt.response_format() if fmt is not None and fmt.type != "text" else None}
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as err:
        raise relabel(validation_error(err), conv.sources) from None


def prepare(serving: Serving, req: ResponsesRequest, adapter: str | None, conv: Conversation) -> Prepared:
    """`req` checked, rendered and tokenized as chat does it (run it on a worker thread)."""
    chat = chat_request(req, conv)
    try:
        return serving.prepare_chat(chat, adapter)
    except APIError as err:
        raise relabel(err, conv.sources) from None


_RENAMED = (("max_tokens", "max_output_tokens"), ("response_format", "text.format"),
            ("tool_choice.function", "tool_choice"), ("messages", "input"))


def relabel(err: APIError, sources: list[str]) -> APIError:
    """A chat error about `messages.N...` (or a chat-only name) as one about the Responses field."""
    def path(p: str) -> str:
        m = re.fullmatch(r"messages\.(\d+)(\..*)?", p)
        if m and int(m[1]) < len(sources):
            src = sources[int(m[1])]
            return src + (m[2] or "") if src.startswith("input.") else src
        p = re.sub(r"^tools\.(\d+)\.function\b", r"tools.\1", p)
        for old, new in _RENAMED:
            if p == old or p.startswith(old + "."):
                return new + p[len(old):]
        return p

    def where(m: re.Match) -> str:  # `messages[3].content` -> `input[2].content`, `instructions`
        src = sources[int(m[1])] if int(m[1]) < len(sources) else "input"
        return re.sub(r"\.(\d+)$", r"[\1]", src) + m[2] if src.startswith("input.") else src

    message = re.sub(r"messages\[(\d+)\]((?:\.\w+)?)", where, err.message)
    message = re.sub(r"\bmessages\.\d+(?:\.\w+)*", lambda m: path(m[0]), message)
    message = re.sub(r"\bmax_tokens\b", "max_output_tokens", message)
    return APIError(err.status, message, err.type, path(err.param) if err.param else None, err.code)


# --------------------------------------------------------------------------- storage
@dataclass
class StoreLimits:
    """How much of this server's memory stored responses may take."""

    max_responses: int = 1024
    """responses kept at once; more evict the least recently used"""
    max_bytes: int = 64 << 20
    """their JSON (body and conversation) kept at once, in bytes"""


@dataclass
class Stored:
    body: dict
    history: list[dict]
    """the conversation up to and including this response's output"""
    size: int


class ResponseStore:
    """Stored responses, in memory, bounded (`StoreLimits`), least recently used evicted first.
    Used from the event loop only."""

    def __init__(self, limits: StoreLimits | None = None):
        self.limits = limits if limits is not None else StoreLimits()
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, rid: str) -> bool:
        return rid in self._items

    def put(self, body: dict, history: list[dict]) -> None:
        size = len(json.dumps(body)) + len(json.dumps(history))
        self.delete(body["id"])
        if size > self.limits.max_bytes or self.limits.max_responses < 1:
            log.warning("response %s (%d bytes) is larger than the whole store: not stored", body["id"], size)
            return
        self._items[body["id"]] = Stored(body, history, size)
        self.bytes += size
        while len(self._items) > self.limits.max_responses or self.bytes > self.limits.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.size

    def get(self, rid: str) -> Stored | None:
        got = self._items.get(rid)
        if got is not None:
            self._items.move_to_end(rid)
        return got

    def delete(self, rid: str) -> bool:
        got = self._items.pop(rid, None)
        if got is not None:
            self.bytes -= got.size
        return got is not None

    def history(self, rid: str | None) -> list[dict]:
        """The conversation `previous_response_id` continues (400 when it is not stored)."""
        if rid is None:
            return []
        got = self.get(rid)
        if got is None:
            raise APIError(400, f"Previous response with id '{rid}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
        return got.history

    def body(self, rid: str) -> dict:
        got = self.get(rid)
        if got is None:
            raise not_found(rid)
        return got.body


def not_found(rid: str) -> APIError:
    return APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")


# --------------------------------------------------------------------------- bodies and events
class ResponseOut:
    """One response's body and its stream of events (each with its `sequence_number`).

    Streamed text goes out as it comes, except, with the hermes format, what could be the start
    of a `<tool_call>` block (and the whitespace before it): the call is not text, so the deltas
    always join to the final `output_text`."""

    def __init__(self, req: ResponsesRequest, prep: Prepared, tokenizer):
        self.req, self.tokenizer, self.prompt_tokens = req, tokenizer, len(prep.ids)
        self.logprobs = req.logprobs
        self.id, self.created, self.msg_id = _id("resp"), created(), _id("msg")
        self.store = req.store is not False
        self.hold = (prep.tools.open,) if isinstance(prep.tools, HermesTools) else ()
        self.seq = 0
        self.started = False
        """the message item was announced (its first text went out)"""
        self.sent = ""
        self.pending, self.pending_lps = "", []
        self.blocked = False
        """a tool call began: the rest of the generation is not text"""
        self._fc_ids: dict[int, str] = {}

    # ---------------------------------------------------------------- the body
    def body(self, ch: Choice | None, status: str | None = None, error: dict | None = None) -> dict:
        req = self.req
        incomplete = ch is not None and ch.finish_reason == "length"
        status = status or ("incomplete" if incomplete else "completed")
        fmt = req.text.format if req.text is not None else None
        choice = req.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": created() if status == "completed" else None, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": req.model,
            "output": self.output(ch) if ch is not None else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id, "reasoning": req.reasoning, "store": self.store,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "top_p": req.top_p if req.top_p is not None else 1.0, "top_logprobs": req.top_logprobs,
            "text": {"format": {"type": "text"} if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True),
                     "verbosity": "medium"},
            "tool_choice": {"type": "function", "name": choice.name} if isinstance(choice, ToolChoice)
            else choice if choice is not None else "auto",
            "tools": [t.body() for t in req.tools or []], "truncation": "disabled",
            "usage": self.usage(ch) if ch is not None else None,
            "metadata": req.metadata or {}, "user": req.user, "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key, "service_tier": "default", "background": False,
        }

    def usage(self, ch: Choice) -> dict:
        return {"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": ch.counters.reused, "cache_write_tokens": 0},
                "output_tokens": ch.tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + ch.tokens}

    def has_message(self, ch: Choice) -> bool:
        return bool(ch.text) or not ch.tool_calls or self.started

    def output(self, ch: Choice) -> list[dict]:
        out = [self.message(ch, "incomplete" if ch.finish_reason == "length" else "completed")] \
            if self.has_message(ch) else []
        return out + [self.function_call(k, c, "completed") for k, c in enumerate(ch.tool_calls)]

    def message(self, ch: Choice | None, status: str) -> dict:
        content = [self.part(ch.text, ch.logprobs)] if ch is not None else []
        return {"id": self.msg_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def part(self, text: str, lps: list[TokenLogprob] | None) -> dict:
        part = {"type": "output_text", "text": text, "annotations": []}
        if self.logprobs:
            part["logprobs"] = self.lps(lps)
        return part

    def lps(self, lps: list[TokenLogprob] | None) -> list[dict]:
        return chat_logprobs(self.tokenizer, lps or [])["content"] if self.logprobs else []

    def function_call(self, k: int, call, status: str, arguments: str | None = None) -> dict:
        item_id = self._fc_ids.setdefault(k, _id("fc"))
        return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
                "arguments": call.arguments if arguments is None else arguments, "status": status}

    def history(self, conv: Conversation, ch: Choice) -> list[dict]:
        """The conversation a later `previous_response_id` continues: `conv` and this answer."""
        m: dict = {"role": "assistant", "content": ch.text if ch.text or not ch.tool_calls else None}
        if ch.tool_calls:
            m["tool_calls"] = [c.as_dict() for c in ch.tool_calls]
        return conv.history() + [m]

    # ---------------------------------------------------------------- events
    def event(self, type: str, **fields) -> dict:
        e = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return e

    def opening(self) -> list[dict]:
        return [self.event("response.created", response=self.body(None, "in_progress")),
                self.event("response.in_progress", response=self.body(None, "in_progress"))]

    def _start(self) -> list[dict]:
        self.started = True
        return [self.event("response.output_item.added", output_index=0, item=self.message(None, "in_progress")),
                self.event("response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0,
                           part=self.part("", [] if self.logprobs else None))]

    def _text(self, text: str, lps: list[TokenLogprob]) -> list[dict]:
        out = [] if self.started else self._start()
        self.sent += text
        return out + [self.event("response.output_text.delta", item_id=self.msg_id, output_index=0, content_index=0,
                                 delta=text, logprobs=self.lps(lps))]

    def delta(self, text: str, lps: list[TokenLogprob] | None) -> list[dict]:
        """The events for new text of the generation."""
        if self.blocked:
            return []
        self.pending += text
        self.pending_lps += lps or []
        send = self.pending
        if self.hold:
            starts = [i for i in (send.find(m) for m in self.hold) if i >= 0]
            if starts:
                send, self.blocked = send[:min(starts)], True
            else:  # keep back a tail that could begin a marker
                send = send[:len(send) - max((k for m in self.hold for k in range(len(m), 0, -1)
                                              if send.endswith(m[:k])), default=0)]
            send = send.rstrip()
        if not send:
            return []
        self.pending = self.pending[len(send):]
        lps_now, self.pending_lps = self.pending_lps, []
        return self._text(send, lps_now)

    def closing(self, ch: Choice) -> list[dict]:
        """The events after the generation: the text's end, the calls, the terminal event."""
        out = []
        if self.has_message(ch):
            if ch.text.startswith(self.sent):
                rest = ch.text[len(self.sent):]
                if rest or self.logprobs and self.pending_lps:  # so the deltas' logprobs join to the part's too
                    out += self._text(rest, self.pending_lps)
            else:  # pragma: no cover - the final text always begins with what was streamed
                log.warning("response %s: streamed text %r is not a prefix of the final text", self.id, self.sent[:80])
            if not self.started:
                out += self._start()
            status = "incomplete" if ch.finish_reason == "length" else "completed"
            common = dict(item_id=self.msg_id, output_index=0, content_index=0)
            out += [self.event("response.output_text.done", **common, text=ch.text, logprobs=self.lps(ch.logprobs)),
                    self.event("response.content_part.done", **common, part=self.part(ch.text, ch.logprobs)),
                    self.event("response.output_item.done", output_index=0, item=self.message(ch, status))]
        first = 1 if self.has_message(ch) else 0
        for k, c in enumerate(ch.tool_calls):
            i = first + k
            item_id = self.function_call(k, c, "in_progress")["id"]
            out += [self.event("response.output_item.added", output_index=i,
                               item=self.function_call(k, c, "in_progress", arguments="")),
                    self.event("response.function_call_arguments.delta", item_id=item_id, output_index=i,
                               delta=c.arguments),
                    self.event("response.function_call_arguments.done", item_id=item_id, output_index=i,
                               arguments=c.arguments),
                    self.event("response.output_item.done", output_index=i, item=self.function_call(k, c, "completed"))]
        body = self.body(ch)
        out.append(self.event("response.incomplete" if body["status"] == "incomplete" else "response.completed",
                              response=body))
        return out

    def failed(self, err: APIError) -> list[dict]:
        """The terminal event of a stream whose generation failed."""
        return [self.event("response.failed", response=self.body(
            None, "failed", {"code": "server_error", "message": err.message}))]
