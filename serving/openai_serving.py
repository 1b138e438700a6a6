"""Turning OpenAI requests into engine work: prompts, choices, tool-call loops, and response bodies.

A request's prompt is tokenized once; with `n > 1` its context is computed once and forked, so the
choices share its KV blocks. Every choice runs on its own engine sequence, and every engine
sequence of a request is closed when it ends, fails or is cancelled (a client that disconnects),
so its blocks go back to the pool. Streaming goes through an `emit` callback per choice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from .async_engine import AsyncEngine
from .openai_protocol import APIError, ChatRequest, CompletionRequest
from .sampling import SamplingParams, TokenLogprob
from .sequence import Counters
from .tool_calls import Call, HermesTools, MarkupTools, Reserved, ToolFormat, json_strings

Emit = Callable[[int, str, list[TokenLogprob] | None], Awaitable[None]]
"""emit(choice index, new text, new logprobs) while a choice streams"""


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | None = None
    """the user's stop string that ended the choice (vLLM's `stop_reason`), else None"""
    tokens: int = 0
    """tokens this choice generated (its share of `completion_tokens`)"""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[Call] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)


@dataclass
class Prepared:
    """A validated request, ready to run."""

    ids: list[int]
    adapter: str | None
    params: SamplingParams
    n: int
    tools: ToolFormat | None = None
    tool_choice: str = "none"
    continues: bool = False
    """the prompt ends inside an assistant turn (after a tool result)"""
    include_stop: bool = False
    """vLLM's `include_stop_str_in_output`: the stop string that ended a choice stays in its text"""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    """The OpenAI endpoints' logic over an `AsyncEngine` (the HTTP layer is `server.py`)."""

    def __init__(self, aengine: AsyncEngine, model_name: str = "base", tool_format: ToolFormat | None = None):
        self.ae = aengine
        self.engine = aengine.engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the server needs a model directory with a tokenizer")
        self.model_name = model_name
        self.tool_format = tool_format
        self.max_model_len = self.engine.max_model_len
        self.reserved = Reserved(self.tokenizer, tool_format)

    # --------------------------------------------------------------- requests
    def adapter_for(self, model: str) -> str | None:
        """`base` -> None; `NAME` or `base:NAME` -> NAME (404 for a model not served)."""
        name = model
        if model == self.model_name:
            return None
        if model.startswith(self.model_name + ":"):
            name = model[len(self.model_name) + 1:]
        if name not in self.engine.registry:
            raise APIError(404, f"The model `{model}` does not exist.", type="invalid_request_error",
                           param="model", code="model_not_found")
        return name

    def _params(self, req, n_prompt: int, default_max: int | None, logprobs: int | None) -> SamplingParams:
        room = self.max_model_len - n_prompt
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your prompt has {n_prompt} tokens.", param="messages" if isinstance(req, ChatRequest)
                           else "prompt", code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else default_max if default_max is not None else room
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
                                f"for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens,
                              temperature=req.temperature if req.temperature is not None else 1.0,
                              top_p=req.top_p if req.top_p is not None else 1.0,
                              top_k=max(req.top_k, 0) if req.top_k is not None else 0,
                              seed=req.seed, stop=list(req.stop or []), ignore_eos=req.ignore_eos, logprobs=logprobs)

    def check_length(self, text: str, param: str) -> None:
        """Refuse text far longer than the context before spending time tokenizing it."""
        if len(text) > 64 * self.max_model_len:
            raise APIError(400, f"{param} of {len(text)} characters is far over the context "
                                f"({self.max_model_len} tokens)", param=param, code="context_length_exceeded")

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            self.check_length(prompt, param)
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        vocab = self.engine.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param=param)
        return list(prompt)

    def prepare_completion(self, req: CompletionRequest) -> list[Prepared]:
        adapter = self.adapter_for(req.model)
        out = []
        for p in req.prompts():
            ids = self._encode(p, "prompt")
            if not ids:
                raise APIError(400, "prompt must contain at least one token", param="prompt")
            out.append(Prepared(ids, adapter, self._params(req, len(ids), 16, req.logprobs), req.n,
                                include_stop=req.include_stop_str_in_output))
        return out

    def render_chat(self, req: ChatRequest, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> tuple[str, ToolFormat | None, bool]:
        """The prompt text of a chat (tool calls and results in the model's tool format), the
        tool format the request may use, and whether the prompt continues an assistant turn."""
        fmt = self.tool_format
        use_tools = False
        if req.tools and fmt is None and req.choice != "none":
            raise APIError(400, "this model has no tool-call format (start the server with --tool-format)",
                           param="tools")
        if fmt is not None:
            use_tools = fmt.check(req.tools, req.choice)
        has_calls = any(m.tool_calls or m.role == "tool" for m in req.messages)
        if has_calls and fmt is None:
            raise APIError(400, "messages carry tool calls but this model has no tool-call format", param="messages")
        if fmt is not None:
            messages, continues = fmt.render(req.messages)
        else:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
            continues = False
        kw = {}
        if isinstance(fmt, HermesTools) and use_tools:
            kw["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt and not continues,
                continue_final_message=continue_final_message or continues, **kw)
        except Exception as err:  # a template that cannot render this conversation (jinja raises anything)
            raise APIError(400, f"the chat template cannot render these messages: {err}", param="messages") from None
        return text, fmt if use_tools else None, continues

    def check_contents(self, req: ChatRequest) -> None:
        """Refuse text that would act as markup in the rendered prompt: special tokens (`<|end|>`,
        role markers: they would end a user turn and open a forged one) anywhere, and the tool
        markup (`[CALC]`, `<tool_call>`, ...: a forged call or result) outside assistant text.
        Tool-call arguments are checked as the prompt will hold them, i.e. JSON-decoded (so
        `\\u003c|end|\\u003e` is `<|end|>`), and so are the declared tools (a template renders them)."""
        reserved = self.reserved
        for i, m in enumerate(req.messages):
            calls = [s for c in m.tool_calls or [] for s in (c.function.name, *json_strings(c.function.arguments))]
            for field, hit in (("content", reserved.find(m.text, m.role)), ("name", reserved.find_any([m.name or ""])),
                               ("tool_calls", reserved.find_any(calls))):
                if hit is not None:
                    raise APIError(400, f"messages[{i}].{field} contains {hit!r}, {reserved.why(hit)}",
                                   param=f"messages.{i}.{field}")
        for j, t in enumerate(req.tools or []):
            hit = reserved.find_any(json_strings(t.model_dump_json()))
            if hit is not None:
                raise APIError(400, f"tools[{j}] contains {hit!r}, {reserved.why(hit)}", param=f"tools.{j}")

    def prepare_chat(self, req: ChatRequest) -> Prepared:
        adapter = self.adapter_for(req.model)
        self.check_contents(req)
        text, fmt, continues = self.render_chat(req)
        ids = self._encode(text, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return Prepared(ids, adapter, self._params(req, len(ids), None, logprobs), req.n, fmt, req.choice, continues,
                        req.include_stop_str_in_output)

    # -------------------------------------------------------------- running
    async def run(self, prep: Prepared, emit: Emit | None = None, first_index: int = 0,
                  group: object = None) -> list[Choice]:
        """Run the request's n choices together; every sequence it opened is closed at the end.
        The sequences of one `group` (one HTTP request) share engine steps fairly with others."""
        seqs: list[int] = []
        try:
            try:
                parent = await self.ae.call(self.engine.open, prep.ids, prep.adapter, group,
                                            undo=self.ae.close_nowait)
            except KeyError:  # the adapter was unloaded after the request was checked
                raise APIError(404, f"The model `{prep.adapter}` does not exist.", param="model",
                               code="model_not_found") from None
            seqs.append(parent)
            if prep.n > 1:
                await self.ae.prefill(parent)  # the copies share the prompt's blocks
                kids = await self.ae.call(self.engine.fork, parent, prep.n, undo=lambda k: self.ae.close_nowait(*k))
                seqs.extend(kids)
                self.ae.close_nowait(parent)
            else:
                kids = [parent]
            jobs = []
            for i, s in enumerate(kids):
                p = prep.params if prep.params.seed is None else replace(prep.params, seed=prep.params.seed + i)
                jobs.append(self._choice(s, p, prep, first_index + i, emit))
            return list(await asyncio.gather(*jobs))
        finally:
            if seqs:
                self.ae.close_nowait(*seqs)

    async def _generate(self, seq: int, params: SamplingParams, adapter: str | None, index: int,
                        emit: Emit | None, into: Choice) -> tuple[str, str | int | None, str]:
        """One engine job; its text and logprobs are added to `into`. Returns (text, stop_reason, finish)."""
        async for d in self.ae.generate(seq, params, adapter, every=emit is not None):
            if emit is not None and (d.text or d.logprobs):
                await emit(index, d.text, d.logprobs)
            if d.finished is None:
                continue
            c = d.finished
            if c.finish_reason == "error":
                raise APIError(500, f"generation failed: {c.error}", type="server_error", code="engine_error")
            into.tokens += len(c.token_ids)
            into.logprobs.extend(c.logprobs or [])
            n = c.counters
            into.counters = Counters(into.counters.prefilled + n.prefilled, into.counters.cached + n.cached,
                                     into.counters.decoded + n.decoded)
            return c.text or "", c.stop_reason, c.finish_reason
        raise APIError(500, "generation ended without a result", type="server_error")

    async def _choice(self, seq: int, params: SamplingParams, prep: Prepared, index: int, emit: Emit | None) -> Choice:
        ch = Choice()
        fmt = prep.tools
        if isinstance(fmt, MarkupTools):
            return await self._markup_choice(seq, params, prep, index, emit, ch)
        text, stop_reason, finish = await self._generate(seq, params, prep.adapter, index, emit, ch)
        text += await self._kept_stop(prep, stop_reason, index, emit)
        ch.text, ch.finish_reason = text, finish
        ch.stop_reason = stop_reason if isinstance(stop_reason, str) else None
        if isinstance(fmt, HermesTools):
            content, calls = fmt.split(text)
            if calls:
                ch.text, ch.tool_calls, ch.finish_reason = content, calls, "tool_calls"
        return ch

    async def _markup_choice(self, seq: int, params: SamplingParams, prep: Prepared, index: int, emit: Emit | None,
                             ch: Choice) -> Choice:
        """Steps of the model between tool-call decisions (see `tool_calls.MarkupTools`)."""
        fmt: MarkupTools = prep.tools
        forced = prep.tool_choice == "required" or prep.tool_choice.startswith("function:")
        boundary = not prep.continues
        user_stops = list(params.stop)
        while True:
            left = params.max_tokens - ch.tokens
            if left <= 0:
                ch.finish_reason = "length"
                return ch
            if boundary and (fmt.proposer is not None or forced):
                call = await self._propose(seq, fmt, forced, ch)
                if call is not None:
                    ch.tool_calls, ch.finish_reason = [call], "tool_calls"
                    return ch
            p = replace(params, max_tokens=left, stop=user_stops + [fmt.step_stop, fmt.open])
            text, stop_reason, finish = await self._generate(seq, p, prep.adapter, index, emit, ch)
            ch.text += text
            if stop_reason in user_stops or stop_reason not in (fmt.step_stop, fmt.open):  # a user stop, EOS, length
                ch.text += await self._kept_stop(prep, stop_reason, index, emit)
                ch.finish_reason = finish
                ch.stop_reason = stop_reason if isinstance(stop_reason, str) else None
                return ch
            if stop_reason == fmt.step_stop:
                ch.text += fmt.step_stop
                if emit is not None:
                    await emit(index, fmt.step_stop, None)
                boundary = True
                continue
            # the model writes the call itself
            room = await self.ae.call(lambda: self.max_model_len - len(self.engine.tokens(seq)))
            if room <= 0:
                ch.finish_reason = "length"
                return ch
            rest = replace(params, max_tokens=min(fmt.max_call_tokens, room), stop=[fmt.close], temperature=0.0,
                           logprobs=None)
            arg, _, finish = await self._generate(seq, rest, prep.adapter, index, None, ch)
            if finish != "stop":  # cut off before the call was complete: no call to make
                ch.finish_reason = "length"
                return ch
            ch.tool_calls, ch.finish_reason = [fmt.parse(fmt.open + arg)], "tool_calls"
            return ch

    async def _kept_stop(self, prep: Prepared, stop_reason: str | int | None, index: int, emit: Emit | None) -> str:
        """The stop string that ended a choice when the request keeps it in the text (vLLM's
        `include_stop_str_in_output`), streamed like the rest; else ''."""
        if not (prep.include_stop and isinstance(stop_reason, str)):
            return ""
        if emit is not None:
            await emit(index, stop_reason, None)
        return stop_reason

    async def _propose(self, seq: int, fmt: MarkupTools, forced: bool, ch: Choice) -> Call | None:
        """Ask the proposer (on a fork: the sequence is unchanged) whether to call the tool now.
        Forced: the call is started for it (or, with no proposer, written on the sequence itself).
        None when it proposes none, when its call would be cut off unfinished, or when the context
        has no room left for a call."""
        eng = self.engine
        prefix = (fmt.invocation if fmt.proposer is not None else "") + (fmt.open if forced else "")
        ids = list(self.tokenizer.encode(prefix, add_special_tokens=False))

        def start() -> int | None:  # on the engine thread: the sequence the call is written on
            if self.max_model_len - len(eng.tokens(seq)) <= len(ids):
                return None  # the engine refuses to generate on a full context
            if fmt.proposer is None:
                eng.extend(seq, ids)
                return seq
            (f,) = eng.fork(seq, 1)
            eng.extend(f, ids)
            return f

        f = await self.ae.call(start, undo=lambda f: f not in (None, seq) and self.ae.close_nowait(f))  # a fork
        if f is None:
            return None
        p = SamplingParams(max_tokens=fmt.max_call_tokens, temperature=0.0, stop=[fmt.close])
        if fmt.proposer is None:  # forced, and the model writes calls itself
            arg, _, finish = await self._generate(seq, p, eng.adapter_of(seq), 0, None, ch)
            return fmt.parse(fmt.open + arg) if finish == "stop" else None
        try:
            scratch = Choice()
            text, _, finish = await self._generate(f, p, fmt.proposer, 0, None, scratch)
        finally:
            self.ae.close_nowait(f)
        call = fmt.parse((fmt.open if forced else "") + text)
        if call is None or finish != "stop":  # no call, or one cut off unfinished (at the close marker or
            return None                        # the end of sequence, the proposer has finished its call)
        ch.tokens += scratch.tokens
        return call


# ------------------------------------------------------------------ bodies
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
            "top_logprobs": [{_tok(tok, t): lp for t, lp in x.top} for x in lps], "text_offset": offsets}


def chat_logprobs(tok, lps: list[TokenLogprob]) -> dict:
    def entry(t: int, lp: float) -> dict:
        s = _tok(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps]}


def _tok(tok, t: int) -> str:
    return tok.decode([t], skip_special_tokens=False)


def created() -> int:
    return int(time.time())
