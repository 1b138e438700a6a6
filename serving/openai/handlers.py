"""What each route of the OpenAI server does: read and check the body, admit the request, run it on
the engine through `Serving`, and answer with the bodies of `responses.py` (whole, or streamed as
server-sent events).

A request asks for sequences (prompts × n); they are counted against `ServerLimits.max_running`
while it runs. A client that disconnects (mid-stream or while waiting) has its work cancelled,
which closes its sequences and frees their blocks. Engine and registry state is touched by engine
commands only (`EngineClient.op`, see `async_engine.py`). A request's latency, tokens
and finish reasons (and a stream's first token) are recorded in `metrics.py` when it ends.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from compression.peft_io import load_adapter

from .boundary import ServerLimits, dumps, read_body
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, LoadLoraRequest, \
    TokenizeRequest, UnloadLoraRequest
from .responses import ChatResponse, Choice, CompletionResponse, created
from .responses_api import ResponseOut, ResponseStore, conversation, not_found, prepare
from .responses_protocol import ResponsesRequest
from .serving import Serving

log = logging.getLogger("kilolora.server")

INLINE_BODY_BYTES = 2048
"""a request body up to this size is rendered and tokenized on the event loop (a short chat takes
well under a millisecond); a larger one on a worker thread, so that it cannot hold up the loop"""


class Handlers:
    """One coroutine per route (see the module docstring); `api_server.create_app` wires them."""

    def __init__(self, serving: Serving, limits: ServerLimits, metrics: ServerMetrics, *, model_name: str,
                 adapter_roots: dict[str, str], allow_adapter_updates: bool, protected: frozenset[str]):
        self.serving, self.ae, self.limits, self.metrics = serving, serving.ae, limits, metrics
        self.model_name, self.roots = model_name, adapter_roots
        self.allow_adapter_updates, self.protected = allow_adapter_updates, protected
        self.stored = ResponseStore()
        """the Responses API's stored responses (this server's memory, bounded)"""

    # ------------------------------------------------------------- generation
    async def completions(self, request: Request):
        arrival = time.monotonic()
        req = await read_body(request, CompletionRequest, self.limits)
        serving = self.serving
        adapter = await serving.adapter_for(req.model)
        preps = await self.off_loop(request, req, serving.prepare_completion, req, adapter)
        k = len(preps) * req.n
        self.admit(k)
        out = CompletionResponse(serving.tokenizer, req.model, sum(len(p.ids) for p in preps), k,
                                 logprobs=req.logprobs is not None, include_usage=_include_usage(req))

        async def work(emit=None):
            runs = [serving.run(p, emit, first_index=j * req.n, group=out.id) for j, p in enumerate(preps)]
            return [c for cs in await asyncio.gather(*runs) for c in cs]

        if not req.stream:
            choices = await self.tracked(self.cancellable(request, work()), k)
            self.finished(arrival, out, choices, whole=True)
            return out.body(choices)
        return StreamingResponse(self.sse(work, out, k, arrival), media_type="text/event-stream")

    async def chat(self, request: Request):
        arrival = time.monotonic()
        req = await read_body(request, ChatRequest, self.limits)
        serving = self.serving
        adapter = await serving.adapter_for(req.model)
        prep = await self.off_loop(request, req, serving.prepare_chat, req, adapter)
        self.admit(req.n)
        out = ChatResponse(serving.tokenizer, req.model, len(prep.ids), req.n, logprobs=bool(req.logprobs),
                           include_usage=_include_usage(req))

        async def work(emit=None):
            return await serving.run(prep, emit, group=out.id)

        if not req.stream:
            choices = await self.tracked(self.cancellable(request, work()), req.n)
            self.finished(arrival, out, choices, whole=True)
            return out.body(choices)
        return StreamingResponse(self.sse(work, out, req.n, arrival), media_type="text/event-stream")

    async def off_loop(self, request: Request, req, fn, *args):
        """`fn(*args)` (render, tokenize and check `req`) off the event loop, on a worker thread,
        unless the body is small (`INLINE_BODY_BYTES`) and asks for no structured output (whose
        grammar may take long to compile). The hop costs two GIL hand-offs, to the worker and back
        (and with the engine on a thread of this process, each can wait up to the interpreter's
        switch interval while a step runs): longer than a short chat takes to render and tokenize."""
        small = getattr(request.state, "body_bytes", INLINE_BODY_BYTES + 1) <= INLINE_BODY_BYTES
        if small and req.structured() is None:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    def finished(self, arrival: float, out: CompletionResponse | ChatResponse, choices: list[Choice],
                 whole: bool = False) -> None:
        """Record a request that ended; a response sent `whole` records its time to first token
        here too (a stream's is recorded when its first chunk goes out)."""
        if whole:
            self.first_token(arrival, choices)
        self.metrics.finished(arrival, out.prompt_tokens, sum(c.tokens for c in choices),
                              [c.finish_reason for c in choices])

    def first_token(self, arrival: float, choices: list[Choice]) -> None:
        at = [c.first_token_at for c in choices if c.first_token_at is not None]
        if at:
            self.metrics.first_token(arrival, min(at))

    def admit(self, seqs: int) -> None:
        """Refuse a request whose `seqs` sequences would go over the in-flight limit."""
        limit = self.limits.max_running
        if seqs > limit:
            raise APIError(400, f"the request asks for {seqs} sequences (prompts × n); the server runs at most "
                                f"{limit} at once", param="n", code="too_many_sequences")
        if self.metrics.running + seqs > limit:
            raise APIError(503, f"the server is at its limit of {limit} sequences in flight; retry",
                           type="server_error", code="overloaded")

    async def cancellable(self, request: Request, coro):
        """Run `coro`; cancel it (closing its sequences) as soon as the client goes away first."""
        task = asyncio.ensure_future(coro)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            self.metrics.cancelled += 1
            task.cancel()
            raise APIError(499, "client disconnected", code="client_closed")
        finally:
            for t in (task, gone):
                if not t.done():
                    t.cancel()

    async def tracked(self, coro, seqs: int):
        self.metrics.started(seqs)
        try:
            return await coro
        finally:
            self.metrics.ended(seqs)

    async def sse(self, work, out: CompletionResponse | ChatResponse, seqs: int,
                  arrival: float) -> AsyncIterator[str]:
        """Server-sent events: `out`'s first chunks, the choices' chunks as they come, the final
        chunks, `[DONE]`. If the client goes away, the generator is closed or cancelled: `work` is
        cancelled and its sequences are closed."""
        q: asyncio.Queue = asyncio.Queue()
        metrics = self.metrics
        first = True

        async def emit(i, text, lps):
            nonlocal first
            if first and (text or lps):
                first = False
                metrics.first_token(arrival)
            await q.put(out.chunk(i, text, lps))

        async def produce():
            try:
                choices = await work(emit)
                self.finished(arrival, out, choices)
                for c in out.final(choices):
                    await q.put(c)
            except APIError as err:
                metrics.errors += 1
                await q.put(err.body())
            except Exception as err:  # the stream already started: report the failure in it
                log.exception("internal error in a stream", exc_info=err)
                metrics.errors += 1
                await q.put(APIError(500, f"internal error: {err!r}", type="server_error").body())
            await q.put(None)

        metrics.started(seqs)
        task = asyncio.ensure_future(produce())
        try:
            for c in out.first():
                yield f"data: {dumps(c)}\n\n"
            while True:
                item = await q.get()
                if item is None:
                    break
                yield f"data: {dumps(item)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            metrics.ended(seqs)
            if not task.done():
                metrics.cancelled += 1
                task.cancel()

    # ------------------------------------------------------------- the Responses API
    async def responses(self, request: Request):
        """POST /v1/responses: answered by the chat path (`responses_api.py`), stored unless `store: false`."""
        arrival = time.monotonic()
        req = await read_body(request, ResponsesRequest, self.limits)
        serving = self.serving
        conv = conversation(req, self.stored.history(req.previous_response_id))
        adapter = await serving.adapter_for(req.model)
        prep = await asyncio.to_thread(prepare, serving, req, adapter, conv)
        self.admit(1)
        out = ResponseOut(req, prep, serving.tokenizer)

        def done(ch: Choice, body: dict) -> None:
            if not req.stream:
                self.first_token(arrival, [ch])
            self.metrics.finished(arrival, out.prompt_tokens, ch.tokens, [ch.finish_reason])
            if out.store:
                self.stored.put(body, out.history(conv, ch))

        if not req.stream:
            [ch] = await self.tracked(self.cancellable(request, serving.run(prep, group=out.id)), 1)
            body = out.body(ch)
            done(ch, body)
            return body
        return StreamingResponse(self.response_events(prep, out, done, arrival), media_type="text/event-stream")

    async def response_events(self, prep, out: ResponseOut, done, arrival: float) -> AsyncIterator[str]:
        """The Responses' server-sent events (`event:` and `data:` lines, no `[DONE]`), as `sse`
        streams chat's: a client that goes away cancels the work."""
        q: asyncio.Queue = asyncio.Queue()
        metrics = self.metrics
        first = True

        async def emit(i, text, lps):
            nonlocal first
            if first and (text or lps):
                first = False
                metrics.first_token(arrival)
            for e in out.delta(text, lps):
                await q.put(e)

        async def produce():
            try:
                [ch] = await self.serving.run(prep, emit, group=out.id)
                events = out.closing(ch)
                done(ch, events[-1]["response"])
            except APIError as err:
                metrics.errors += 1
                events = out.failed(err)
            except Exception as err:  # the stream already started: report the failure in it
                log.exception("internal error in a stream", exc_info=err)
                metrics.errors += 1
                events = out.failed(APIError(500, f"internal error: {err!r}", type="server_error"))
            for e in events + [None]:
                await q.put(e)

        opening = out.opening()
        metrics.started(1)
        task = asyncio.ensure_future(produce())
        try:
            for e in opening:
                yield f"event: {e['type']}\ndata: {dumps(e)}\n\n"
            while (e := await q.get()) is not None:
                yield f"event: {e['type']}\ndata: {dumps(e)}\n\n"
        finally:
            metrics.ended(1)
            if not task.done():
                metrics.cancelled += 1
                task.cancel()

    async def get_response(self, response_id: str, request: Request):
        """GET /v1/responses/{id}: a stored response's body (404 when unknown or evicted)."""
        if request.query_params.get("stream", "false").lower() not in ("false", "0"):
            raise APIError(400, "streaming a stored response again is not supported; GET it without stream",
                           param="stream", code="unsupported_value")
        return self.stored.body(response_id)

    async def delete_response(self, response_id: str):
        """DELETE /v1/responses/{id}"""
        if not self.stored.delete(response_id):
            raise not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    # ------------------------------------------------------------- the rest
    async def health(self):
        return {"status": "ok"}

    async def ping(self):
        return await self.health()

    async def version(self):
        return {"version": _version()}

    async def models(self):
        now = created()
        names = await self.ae.op("adapters")  # the registry changes on the engine's side
        return {"object": "list", "data": [self.card(self.model_name, None, now)]
                + [self.card(name, name, now) for name in names]}

    async def model(self, model_id: str):
        """GET /v1/models/{id}: the card of `base`, `NAME` or `base:NAME` (404 `model_not_found`)."""
        return self.card(model_id, await self.serving.adapter_for(model_id), created())

    def card(self, model_id: str, adapter: str | None, now: int) -> dict:
        """OpenAI's model object (with vLLM's `root`, `parent`, `max_model_len`); `adapter` None: the base."""
        if adapter is None:
            return {"id": model_id, "object": "model", "created": now, "owned_by": "kilolora",
                    "root": self.model_name, "parent": None, "max_model_len": self.serving.max_model_len}
        return {"id": model_id, "object": "model", "created": now, "owned_by": "kilolora",
                "root": self.roots.get(adapter, adapter), "parent": self.model_name}

    async def render_metrics(self):
        st = await self.ae.stats()
        return Response(self.metrics.render(st, st.pop("step_seconds")), media_type=CONTENT_TYPE)

    def updates_allowed(self) -> None:
        if not self.allow_adapter_updates:
            raise APIError(403, "runtime adapter updates are off on this server (start it with "
                                "--allow-adapter-updates to enable load_lora_adapter / unload_lora_adapter)",
                           code="adapter_updates_disabled")

    async def load_lora(self, request: Request):
        self.updates_allowed()
        req = await read_body(request, LoadLoraRequest, self.limits)
        if req.lora_name == self.model_name or req.lora_name in self.protected:
            raise APIError(403, f"the adapter name {req.lora_name!r} is the server's own and cannot be replaced",
                           param="lora_name", code="adapter_protected")
        path = Path(req.lora_path)
        try:
            if "://" in req.lora_path or not path.is_absolute() and not path.exists():
                raise APIError(400, f"lora_path must be a local directory; {req.lora_path!r} is not one (adapters "
                                    f"are never downloaded)", param="lora_path")
            if not path.is_dir():
                raise APIError(400, f"lora_path {req.lora_path!r} is not a directory", param="lora_path")
            if (path / "bank.json").is_file():
                raise APIError(400, f"{req.lora_path!r} is a compressed bank: banks are served from the start "
                                    f"(`kilolora serve --bank DIR`); this endpoint loads PEFT adapter directories",
                               param="lora_path")
        except OSError as err:
            raise APIError(400, f"lora_path {req.lora_path[:200]!r} cannot be read: {err.strerror or err}",
                           param="lora_path") from None
        if not req.load_inplace and await self.ae.op("has_adapter", req.lora_name):
            raise APIError(400, f"The lora adapter '{req.lora_name}' has already been loaded.", param="lora_name")
        try:
            # Read and check the files on a worker thread (configs are size-bounded before they are
            # read); only the copy into the registry's stacks runs on the engine, between steps.
            adapter = await asyncio.to_thread(load_adapter, path, req.lora_name)
            # load_inplace (vLLM's name): new weights under the same name, refused while in use
            await self.ae.op("add_adapter", req.lora_name, adapter, req.load_inplace)
        except (ValueError, FileNotFoundError, KeyError, OSError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise APIError(400, f"cannot load {req.lora_path!r}: {msg}", param="lora_path") from None
        self.roots[req.lora_name] = str(path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload_lora(self, request: Request):
        self.updates_allowed()
        req = await read_body(request, UnloadLoraRequest, self.limits)
        refused = await self.ae.op("unload_adapter", req.lora_name, self.protected)
        if isinstance(refused, tuple):  # (why, message)
            why, message = refused
            status, code = {"missing": (404, "model_not_found"), "protected": (403, "adapter_protected"),
                            "in_use": (409, "adapter_in_use")}[why]
            raise APIError(status, message, param="lora_name", code=code)
        self.roots.pop(req.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    async def tokenize(self, request: Request):
        req = await read_body(request, TokenizeRequest, self.limits)
        serving = self.serving
        tok = serving.tokenizer

        def work():  # tokenizing a large body takes a while: off the event loop
            if req.messages is not None:  # rendered as the chat endpoint renders them, tool calls included
                chat = ChatRequest(model=self.model_name, messages=req.messages,
                                   add_generation_prompt=req.add_generation_prompt,
                                   continue_final_message=req.continue_final_message,
                                   chat_template_kwargs=req.chat_template_kwargs)
                serving.check_contents(chat)
                text, _, _ = serving.render_chat(chat)
            else:
                text = req.prompt
            serving.check_length(text, "prompt" if req.messages is None else "messages")
            return text, tok.encode(text, add_special_tokens=req.add_special_tokens)

        text, ids = await asyncio.to_thread(work)
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids, "prompt": text}

    async def detokenize(self, request: Request):
        req = await read_body(request, DetokenizeRequest, self.limits)
        vocab = self.serving.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": self.serving.tokenizer.decode(req.tokens)}


def _include_usage(req: CompletionRequest | ChatRequest) -> bool:
    return req.stream_options is not None and bool(req.stream_options.include_usage)


def _version() -> str:
    try:
        return importlib.metadata.version("kilolora")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


async def _disconnected(request: Request) -> None:
    """Return when the client has gone. Once the body is read, the ASGI server's `receive()` waits
    until the connection closes and then answers `http.disconnect`: no polling, so a request is
    cancelled the moment its client leaves, not at the next poll."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
