"""Turning OpenAI requests into engine work: prompts checked, rendered and tokenized, then the
choices run on engine sequences (the markup tool format's loop is in `tool_loop.py`).

A request's prompt is tokenized once; with `n > 1` its context is computed once and forked, so the
choices share its KV blocks. A prompt that is scored (completions' `echo` with `logprobs`, vLLM's
`prompt_logprobs`) is scored first, by the engine's own `score` (`EngineClient.score`: the
log-probability of each prompt token after the ones before it, in the shared batch), so the
numbers are those `Engine.score` gives; the choices then generate from the prefix cache it
filled. Every choice runs on its own engine sequence, and every engine sequence of a request is
closed when it ends, fails or is cancelled (a client that disconnects), so its blocks go back to
the pool. A request with one choice and no markup tool loop (the common case) is opened and
submitted in one engine command (`EngineClient.stream`), so that it joins the next engine step
instead of waiting for one step per command. Streaming goes through an `emit` callback per choice.
Engine and registry state is touched by engine commands only (`EngineClient.op`), but for the
adapter names (`adapter_for`, a lookup that `open` checks again); tokenizing and rendering run
wherever the caller runs them (the handlers: on the event loop for a small body, else on a worker
thread).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from ..async_engine import EngineClient
from ..sampling import SamplingParams, TokenLogprob
from ..tokens import Tokens
from .protocol import APIError, ChatRequest, CompletionRequest
from .responses import Choice, PromptLogprobs
from .tool_formats import HermesTools, MarkupTools, Reserved, ToolFormat, json_strings
from .tool_loop import markup_choice

Emit = Callable[[int, str, list[TokenLogprob] | None], Awaitable[None]]
"""emit(choice index, new text, new logprobs) while a choice streams"""


@dataclass
class Prepared:
    """A validated request, ready to run."""

    ids: list[int]
    adapter: str | None
    params: SamplingParams | None
    """None: nothing to generate (completions' `max_tokens: 0` under echo)"""
    n: int
    tools: ToolFormat | None = None
    tool_choice: str = "none"
    continues: bool = False
    """the prompt ends inside an assistant turn (after a tool result)"""
    include_stop: bool = False
    """vLLM's `include_stop_str_in_output`: the stop string that ended a choice stays in its text"""
    echo: str | None = None
    """completions' `echo`: the prompt's text, which starts every choice"""
    logprobs: int | None = None
    """completions' `logprobs` (the echoed prompt's tokens carry that many alternatives)"""
    prompt_top: int | None = None
    """k >= 0: the prompt is scored, with k alternatives per token; None: it is not"""
    prompt_logprobs: int | None = None
    """vLLM's `prompt_logprobs`: each choice reports the prompt's scores with this many alternatives"""


class Serving:
    """The OpenAI endpoints' logic over an engine client (`AsyncEngine` on a thread, `EngineProcess`
    in a process of its own; the HTTP layer is `handlers.py`)."""

    def __init__(self, aengine: EngineClient, model_name: str = "base", tool_format: ToolFormat | None = None):
        self.ae = aengine
        self.engine = aengine.engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the server needs a model directory with a tokenizer")
        self.model_name = model_name
        self.tool_format = tool_format
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.config.vocab_size
        self.reserved = Reserved(self.tokenizer, tool_format)

    # --------------------------------------------------------------- requests
    async def adapter_for(self, model: str) -> str | None:
        """`base` -> None; `NAME` or `base:NAME` -> NAME (404 for a model not served).

        Read here, on the event loop, without an engine command (which would hold the request back
        until the step in progress ends): in the engine's registry on a thread (a dict lookup,
        atomic under the GIL), in the engine process's copy of the names otherwise. The registry
        changes between steps, so the answer may be stale by the time the request runs: an adapter
        unloaded in between makes `open` raise KeyError there, which is answered with the same 404."""
        return self._adapter_for(model)

    def _adapter_for(self, model: str) -> str | None:
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
        if any(t >= self.vocab_size for t in req.stop_token_ids or []):
            raise APIError(400, f"stop_token_ids must be below the vocabulary size {self.vocab_size}",
                           param="stop_token_ids")

        def given(v, default):
            return v if v is not None else default

        kw = dict(repetition_penalty=given(req.repetition_penalty, 1.0), presence_penalty=given(req.presence_penalty, 0.0),
                  frequency_penalty=given(req.frequency_penalty, 0.0), min_p=given(req.min_p, 0.0),
                  min_tokens=min(given(req.min_tokens, 0), max_tokens), stop_token_ids=list(req.stop_token_ids or []),
                  skip_special_tokens=given(req.skip_special_tokens, True))
        structured = req.structured()  # (field, spec) or None: compiled here, off the engine, and cached
        if structured is not None:
            try:
                self.engine.grammars.compile(structured[1])
            except ValueError as err:
                raise APIError(400, f"invalid value for {structured[0]!r}: {err}", param=structured[0],
                               code="invalid_value") from None
            kw["structured_outputs"] = structured[1]
        try:
            return SamplingParams(max_tokens=max_tokens,
                                  temperature=req.temperature if req.temperature is not None else 1.0,
                                  top_p=req.top_p if req.top_p is not None else 1.0,
                                  top_k=max(req.top_k, 0) if req.top_k is not None else 0,
                                  seed=req.seed, stop=list(req.stop or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
                                  **kw)
        except ValueError as err:  # what only the engine's rules refuse (e.g. a stop token id past the vocabulary)
            raise APIError(400, str(err), param=str(err).split(" ", 1)[0]) from None

    def check_length(self, text: str, param: str) -> None:
        """Refuse text far longer than the context before spending time tokenizing it."""
        if len(text) > 64 * self.max_model_len:
            raise APIError(400, f"{param} of {len(text)} characters is far over the context "
                                f"({self.max_model_len} tokens)", param=param, code="context_length_exceeded")

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            self.check_length(prompt, param)
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        vocab = self.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param=param)
        return list(prompt)

    def prepare_completion(self, req: CompletionRequest, adapter: str | None) -> list[Prepared]:
        """The request's prompts, tokenized and checked; `adapter` is `adapter_for(req.model)`."""
        out = []
        for p in req.prompts():
            ids = self._encode(p, "prompt")
            if not ids:
                raise APIError(400, "prompt must contain at least one token", param="prompt")
            if req.max_tokens == 0:  # the prompt alone: it may fill the context
                if len(ids) > self.max_model_len:
                    raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                        f"However, your prompt has {len(ids)} tokens.", param="prompt",
                                   code="context_length_exceeded")
                params = None
            else:
                params = self._params(req, len(ids), 16, req.logprobs)
            echo = None
            if req.echo:
                echo = p if isinstance(p, str) else self.tokenizer.decode(ids, skip_special_tokens=False)
            out.append(Prepared(ids, adapter, params, req.n, include_stop=req.include_stop_str_in_output, echo=echo,
                                logprobs=req.logprobs, prompt_top=req.prompt_top,
                                prompt_logprobs=req.prompt_logprobs_k))
        return out

    def render_chat(self, req: ChatRequest) -> tuple[str, ToolFormat | None, bool]:
        """The prompt text of a chat (tool calls and results in the model's tool format; the
        request's `add_generation_prompt`, `continue_final_message` and `chat_template_kwargs`),
        the tool format the request may use, and whether the prompt continues an assistant turn."""
        fmt = self.tool_format
        bound = None
        if req.tools and fmt is None and req.choice != "none":
            raise APIError(400, "this model has no tool-call format (start the server with --tool-format)",
                           param="tools")
        if fmt is not None:
            bound = fmt.bind(req.tools, req.choice)  # the format with the client's declared tool(s)
            fmt = bound or fmt
        has_calls = any(m.tool_calls or m.role == "tool" for m in req.messages)
        if has_calls and fmt is None:
            raise APIError(400, "messages carry tool calls but this model has no tool-call format", param="messages")
        if fmt is not None:
            messages, continues = fmt.render(req.messages)
        else:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
            continues = False
        kw = dict(req.chat_template_kwargs or {})
        if isinstance(fmt, HermesTools) and bound is not None:
            kw["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        continues = continues or req.continue_final_message
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt and not continues,
                continue_final_message=continues, **kw)
        except Exception as err:  # a template that cannot render this conversation (jinja raises anything)
            raise APIError(400, f"the chat template cannot render these messages: {err}", param="messages") from None
        return text, bound, continues

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
        for k, v in (req.chat_template_kwargs or {}).items():  # the template may write them into the prompt
            hit = reserved.find_any(json_strings(json.dumps(v)))
            if hit is not None:
                raise APIError(400, f"chat_template_kwargs.{k} contains {hit!r}, {reserved.why(hit)}",
                               param=f"chat_template_kwargs.{k}")

    def prepare_chat(self, req: ChatRequest, adapter: str | None) -> Prepared:
        """The chat rendered, tokenized and checked; `adapter` is `adapter_for(req.model)`."""
        self.check_contents(req)
        text, fmt, continues = self.render_chat(req)
        if fmt is not None and req.structured() is not None:  # a grammar holds the whole answer: no call fits in it
            field = req.structured()[0]
            raise APIError(400, f"{field!r} (a structured output) cannot be combined with tools the model may call; "
                                f"send tool_choice 'none' (or no tools) with it", param=field, code="unsupported_value")
        ids = self._encode(text, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return Prepared(ids, adapter, self._params(req, len(ids), None, logprobs), req.n, fmt, req.choice, continues,
                        req.include_stop_str_in_output)

    # -------------------------------------------------------------- running
    async def run(self, prep: Prepared, emit: Emit | None = None, first_index: int = 0,
                  group: object = None) -> list[Choice]:
        """Run the request's n choices together; every sequence it opened is closed at the end.
        The sequences of one `group` (one HTTP request) share engine steps fairly with others.
        A scored prompt is scored first; an echoed prompt starts every choice (streamed first)."""
        scored = await self.score_prompt(prep, group) if prep.prompt_top is not None else None
        head: list[TokenLogprob] | None = None
        if prep.echo is not None and prep.logprobs is not None:
            head = scored.limited(prep.logprobs).entries()
        if prep.echo is not None and emit is not None:
            for i in range(prep.n):
                await emit(first_index + i, prep.echo, head)
        if prep.params is None:
            choices = [Choice(finish_reason="length") for _ in range(prep.n)]
        else:
            choices = await self._run_choices(prep, emit, first_index, group)
        for c in choices:
            if prep.echo is not None:
                c.text = prep.echo + c.text
                c.logprobs = (head or []) + c.logprobs
            if prep.prompt_logprobs is not None:
                c.prompt_logprobs = scored.limited(prep.prompt_logprobs)
        if scored is not None:  # the prompt's cached tokens are those its scoring found
            for c in choices:
                c.counters = Tokens()
            choices[0].counters = scored.counters
        return choices

    async def score_prompt(self, prep: Prepared, group: object = None) -> PromptLogprobs:
        """Each prompt token's log-probability after the ones before it (`Engine.score` of
        ids[1:] after ids[:1]), with its rank and `prep.prompt_top` alternatives."""
        ids = prep.ids
        if len(ids) == 1:
            return PromptLogprobs(ids, [], [], [], Tokens())
        seq = await self.ae.op("open", ids[:1], None, group, undo="close")
        try:
            r = await self.ae.score(seq, ids[1:], prep.adapter, prep.prompt_top)
        except KeyError:  # the adapter was unloaded after the request was checked
            raise APIError(404, f"The model `{prep.adapter}` does not exist.", param="model",
                           code="model_not_found") from None
        except RuntimeError as err:
            raise APIError(500, f"scoring the prompt failed: {err}", type="server_error", code="engine_error") from None
        finally:
            self.ae.close_nowait(seq)
        return PromptLogprobs(ids, r.logprobs, r.ranks, r.top, r.counters)

    async def _run_choices(self, prep: Prepared, emit: Emit | None, first_index: int, group: object) -> list[Choice]:
        if prep.n == 1 and not isinstance(prep.tools, MarkupTools):  # one engine job: opened and submitted at once
            return [await self._choice(None, prep.params, prep, first_index, emit, group)]
        seqs: list[int] = []
        try:
            try:
                parent = await self.ae.op("open", prep.ids, prep.adapter, group, undo="close")
            except KeyError:  # the adapter was unloaded after the request was checked
                raise APIError(404, f"The model `{prep.adapter}` does not exist.", param="model",
                               code="model_not_found") from None
            seqs.append(parent)
            if prep.n > 1:
                await self.ae.prefill(parent)  # the copies share the prompt's blocks
                kids = await self.ae.op("fork", parent, prep.n, undo="close")
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

    async def generate(self, seq: int, params: SamplingParams, adapter: str | None, index: int,
                       emit: Emit | None, into: Choice) -> tuple[str, str | int | None, str]:
        """One engine job; its text and logprobs are added to `into`. Returns (text, stop_reason, finish)."""
        return await self._collect(self.ae.generate(seq, params, adapter, every=emit is not None), index, emit, into)

    async def _collect(self, deltas, index: int, emit: Emit | None, into: Choice) -> tuple[str, str | int | None, str]:
        async for d in deltas:
            if emit is not None and (d.text or d.logprobs):
                await emit(index, d.text, d.logprobs)
            if d.finished is None:
                continue
            c = d.finished
            if c.finish_reason == "error":
                raise APIError(500, f"generation failed: {c.error}", type="server_error", code="engine_error")
            into.tokens += len(c.token_ids)
            if into.first_token_at is None:
                into.first_token_at = d.first_token_at
            into.logprobs.extend(c.logprobs or [])
            into.counters += c.counters
            return c.text or "", c.stop_reason, c.finish_reason
        raise APIError(500, "generation ended without a result", type="server_error")

    async def _choice(self, seq: int | None, params: SamplingParams, prep: Prepared, index: int, emit: Emit | None,
                      group: object = None) -> Choice:
        """One choice on `seq`, or (`seq` None, not the markup format) on a sequence of the prompt
        opened for it in `group`, in the same engine-thread command as its job, and closed after."""
        ch = Choice()
        fmt = prep.tools
        if isinstance(fmt, MarkupTools):
            return await markup_choice(self, seq, params, prep, index, emit, ch)
        if seq is not None:
            text, stop_reason, finish = await self.generate(seq, params, prep.adapter, index, emit, ch)
        else:
            try:
                text, stop_reason, finish = await self._collect(
                    self.ae.stream(prep.ids, params, prep.adapter, group, every=emit is not None), index, emit, ch)
            except KeyError:  # the adapter was unloaded after the request was checked
                raise APIError(404, f"The model `{prep.adapter}` does not exist.", param="model",
                               code="model_not_found") from None
        text += await self.kept_stop(prep, stop_reason, index, emit)
        ch.text, ch.finish_reason = text, finish
        ch.stop_reason = stop_reason if isinstance(stop_reason, (str, int)) else None  # a stop string or token id
        if isinstance(fmt, HermesTools):
            content, calls = fmt.split(text)
            if calls:
                ch.text, ch.tool_calls, ch.finish_reason = content, calls, "tool_calls"
        return ch

    async def kept_stop(self, prep: Prepared, stop_reason: str | int | None, index: int, emit: Emit | None) -> str:
        """The stop string that ended a choice when the request keeps it in the text (vLLM's
        `include_stop_str_in_output`), streamed like the rest; else ''."""
        if not (prep.include_stop and isinstance(stop_reason, str)):
            return ""
        if emit is not None:
            await emit(index, stop_reason, None)
        return stop_reason
