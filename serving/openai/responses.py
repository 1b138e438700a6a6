"""The response bodies of the OpenAI endpoints, built in one place: a finished `Choice`, the whole
response, the streamed chunks (first, per token, closing) and the usage block.

`/v1/completions` and `/v1/chat/completions` share the envelope (`id`, `object`, `created`,
`model`), the usage block and the closing `include_usage` chunk; they differ in how a choice, a
chunk and logprobs look (legacy `text` + `text_offset`, or chat `message` / `delta` + `content`).

A scored prompt (completions' `echo` with `logprobs`, vLLM's `prompt_logprobs`) is reported as
vLLM reports it (`vllm/entrypoints/openai/serving_completion.py`): in the legacy logprobs the
prompt's tokens come first, the first with `null` log-probability and `null` top_logprobs;
`prompt_logprobs` is `[null, {token_id: {logprob, rank, decoded_token}}, ...]`, each entry the
prompt token first, then the k most likely. Legacy `top_logprobs` hold the k most likely tokens
and the chosen one (OpenAI: "up to logprobs + 1 elements").
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace

from ..sampling import TokenLogprob
from ..sequence import Tokens
from .tool_formats import Call


@dataclass
class PromptLogprobs:
    """A prompt scored by the engine (`Engine.score_ranked` of its tokens after the first): `ids` are
    the prompt's tokens; `logprobs[j]`, `ranks[j]`, `top[j]` belong to token j + 1."""

    ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]
    counters: Tokens = field(default_factory=Tokens)
    """what scoring it computed, and found in the prefix cache"""

    def limited(self, k: int) -> PromptLogprobs:
        """The same with at most k alternatives per token."""
        return replace(self, top=[t[:k] for t in self.top])

    def entries(self) -> list[TokenLogprob]:
        """The prompt's tokens as completion logprobs entries: the first unscored (`unscored`)."""
        return [unscored(self.ids[0])] + [TokenLogprob(t, lp, list(top)) for t, lp, top
                                          in zip(self.ids[1:], self.logprobs, self.top)]


def unscored(token: int) -> TokenLogprob:
    """A token without a log-probability (a prompt's first): `null` in the response."""
    return TokenLogprob(token, None, [])  # type: ignore[arg-type]


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """the user's stop string or stop token id that ended the choice (vLLM's `stop_reason`), else None"""
    tokens: int = 0
    """tokens this choice generated (its share of `completion_tokens`)"""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[Call] = field(default_factory=list)
    counters: Tokens = field(default_factory=Tokens)
    prompt_logprobs: PromptLogprobs | None = None
    """vLLM's `prompt_logprobs` of the choice (None: not asked for)"""
    first_token_at: float | None = None
    """`time.monotonic()` of the choice's first generated token (None: it generated none)"""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def created() -> int:
    return int(time.time())


def usage(prompt_tokens: int, choices: list[Choice], cached: int) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def completion_logprobs(tok, lps: list[TokenLogprob], offset: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_tok(tok, x.token) for x in lps]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [_top(tok, x, s) for x, s in zip(lps, tokens)], "text_offset": offsets}


def _top(tok, x: TokenLogprob, text: str) -> dict[str, float] | None:
    if x.logprob is None:
        return None
    top = {_tok(tok, t): lp for t, lp in x.top}
    top.setdefault(text, x.logprob)
    return top


def prompt_logprobs(tok, p: PromptLogprobs) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first token, then {token_id: {logprob, rank,
    decoded_token}} holding the prompt's token and the most likely ones (ranks 1, 2, ...)."""
    out: list[dict | None] = [None]
    for t, lp, rank, top in zip(p.ids[1:], p.logprobs, p.ranks, p.top):
        entry = {t: {"logprob": lp, "rank": rank, "decoded_token": _tok(tok, t)}}
        for r, (u, ulp) in enumerate(top, 1):
            entry.setdefault(u, {"logprob": ulp, "rank": r, "decoded_token": _tok(tok, u)})
        out.append(entry)
    return out


def chat_logprobs(tok, lps: list[TokenLogprob]) -> dict:
    def entry(t: int, lp: float) -> dict:
        s = _tok(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps]}


def _tok(tok, t: int) -> str:
    return tok.decode([t], skip_special_tokens=False)


class _Response:
    """The bodies of one request's response; `chunk(i, text, logprobs)` is what a streaming choice emits."""

    id_prefix: str
    object: str
    """the whole response's `object`"""
    chunk_object: str
    """a streamed chunk's `object`"""

    def __init__(self, tokenizer, model: str, prompt_tokens: int, *, logprobs: bool, include_usage: bool):
        self.tokenizer, self.model, self.prompt_tokens = tokenizer, model, prompt_tokens
        self.logprobs, self.include_usage = logprobs, include_usage
        self.id, self.created = new_id(self.id_prefix), created()

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, choices: list[Choice]) -> dict:
        return usage(self.prompt_tokens, choices, sum(c.counters.reused for c in choices))

    def first(self) -> list[dict]:
        """The chunks sent before any choice has text."""
        return []

    def closing(self, i: int, c: Choice) -> list[dict]:
        raise NotImplementedError

    def final(self, choices: list[Choice]) -> list[dict]:
        """The chunks that close a stream: each choice's closing chunks, then usage if asked for."""
        out = [x for i, c in enumerate(choices) for x in self.closing(i, c)]
        if self.include_usage:
            out.append({**self.head(self.chunk_object), "choices": [], "usage": self.usage(choices)})
        return out


class CompletionResponse(_Response):
    """POST /v1/completions: `text_completion` bodies with legacy logprobs."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, model: str, prompt_tokens: int, choices: int, *, logprobs: bool,
                 include_usage: bool):
        super().__init__(tokenizer, model, prompt_tokens, logprobs=logprobs, include_usage=include_usage)
        self.offsets = [0] * choices  # text_offset counts from the start of a choice, not of a chunk

    def body(self, choices: list[Choice]) -> dict:
        return {**self.head(self.object), "choices": [self.choice(i, c) for i, c in enumerate(choices)],
                "usage": self.usage(choices)}

    def choice(self, i: int, c: Choice) -> dict:
        out = {"index": i, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
               "logprobs": completion_logprobs(self.tokenizer, c.logprobs) if self.logprobs else None}
        if c.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs(self.tokenizer, c.prompt_logprobs)
        return out

    def chunk(self, i: int, text: str, lps: list[TokenLogprob] | None, finish: str | None = None,
              stop_reason: str | int | None = None) -> dict:
        lp = None
        if self.logprobs and (lps or finish is None):
            lp = completion_logprobs(self.tokenizer, lps or [], self.offsets[i])
            self.offsets[i] += sum(len(x) for x in lp["tokens"])
        return {**self.head(self.chunk_object),
                "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lp,
                             "stop_reason": stop_reason}]}

    def closing(self, i: int, c: Choice) -> list[dict]:
        return [self.chunk(i, "", None, c.finish_reason, c.stop_reason)]


class ChatResponse(_Response):
    """POST /v1/chat/completions: `chat.completion` bodies and `chat.completion.chunk` deltas."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, model: str, prompt_tokens: int, choices: int, *, logprobs: bool,
                 include_usage: bool):
        super().__init__(tokenizer, model, prompt_tokens, logprobs=logprobs, include_usage=include_usage)
        self.n = choices

    def body(self, choices: list[Choice]) -> dict:
        return {**self.head(self.object),
                "choices": [{"index": i, "message": self.message(c), "finish_reason": c.finish_reason,
                             "stop_reason": c.stop_reason,
                             "logprobs": chat_logprobs(self.tokenizer, c.logprobs) if self.logprobs else None}
                            for i, c in enumerate(choices)],
                "usage": self.usage(choices)}

    @staticmethod
    def message(c: Choice) -> dict:
        m = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None}
        if c.tool_calls:
            m["tool_calls"] = [x.as_dict() for x in c.tool_calls]
        return m

    def chunk(self, i: int, text: str, lps: list[TokenLogprob] | None, finish: str | None = None,
              delta: dict | None = None) -> dict:
        d = delta if delta is not None else {"content": text}
        return {**self.head(self.chunk_object),
                "choices": [{"index": i, "delta": d, "finish_reason": finish,
                             "logprobs": chat_logprobs(self.tokenizer, lps or []) if self.logprobs and lps
                             else None}]}

    def first(self) -> list[dict]:
        return [self.chunk(i, "", None, delta={"role": "assistant", "content": ""}) for i in range(self.n)]

    def closing(self, i: int, c: Choice) -> list[dict]:
        out = []
        if c.tool_calls:
            calls = [{"index": k, **x.as_dict()} for k, x in enumerate(c.tool_calls)]
            out.append(self.chunk(i, "", None, delta={"tool_calls": calls}))
        out.append(self.chunk(i, "", None, c.finish_reason, delta={}))
        return out
