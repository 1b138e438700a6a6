"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine and its adapters.

    GET  /v1/models                  the base (`base`) and every adapter (`parent: base`)
    POST /v1/completions             prompt(s) -> text; stream, n, logprobs, stop, seed, ...
    POST /v1/chat/completions        messages -> message; stream, tools / tool_calls, logprobs, ...
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}: a local PEFT directory or bank
    POST /v1/unload_lora_adapter     {"lora_name"}
    POST /tokenize, /detokenize      vLLM's shapes (the HTTP orchestrator backend renders chats here)
    GET  /health, /metrics           liveness; Prometheus text (KV blocks, sequences, requests)

`model` picks the adapter: `base`, `NAME` or `base:NAME`. Every request runs in the engine's one
continuous batch. Every failure is an OpenAI-shaped error body with its status code; a client that
disconnects (mid-stream or while waiting) has its sequences closed, which frees their blocks.

What one client can do to the others is bounded here (`ServerLimits`): bodies are size-, time- and
depth-limited and must be JSON (`Content-Type: application/json`, so no cross-site form can drive
the API); sequences in flight (prompts × n) are counted against one limit and share engine steps
fairly between requests; with an API key every route but `/health` and `/metrics` needs
`Authorization: Bearer KEY`; adapters change at run time only with `allow_adapter_updates`, and
never those the server's own features use.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as err:  # pragma: no cover - the dependency is declared; this names the fix
    raise ImportError("the server needs fastapi and uvicorn: pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from err

from .async_engine import AsyncEngine
from .engine import Engine
from .openai_protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, LoadLoraRequest, \
    TokenizeRequest, UnloadLoraRequest, validation_error
from compression.peft_io import load_adapter
from .openai_serving import Choice, Serving, chat_logprobs, completion_logprobs, created, new_id, usage
from .tool_calls import ToolFormat

log = logging.getLogger("kilolora.server")


@dataclass
class ServerLimits:
    """What one request may ask of the server."""

    max_body_bytes: int = 1 << 20
    """larger request bodies get 413"""
    max_running: int = 512
    """sequences in flight at once (each request counts prompts × n); more get 503 (retry later),
    and one request asking for more than this alone gets 400"""
    disconnect_poll_s: float = 0.25
    """how often a non-streaming request checks whether its client is still there"""
    body_timeout_s: float = 30.0
    """a request body must arrive within this (half-sent bodies get 408, not a held connection)"""
    max_json_depth: int = 64
    """deepest nesting of a request body's JSON"""


OPEN_PATHS = ("/health", "/metrics")
"""routes that need no API key (liveness probes and scrapers)"""


class _Gate:
    """ASGI middleware in front of every route: the API key, and JSON-only POST bodies (a browser
    can send `text/plain` or form posts cross-site without a preflight; it cannot send JSON)."""

    def __init__(self, app, api_key: str | None, on_error):
        self.app, self.api_key, self.on_error = app, api_key, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.check(scope)
            if err is not None:
                self.on_error()
                await StrictJSON(err.body(), status_code=err.status,
                                   headers={"WWW-Authenticate": "Bearer"} if err.status == 401 else None
                                   )(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                return APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                                type="invalid_request_error", code="invalid_api_key")
        if scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return APIError(415, f"request bodies must be JSON with 'Content-Type: application/json', got "
                                     f"{ctype.decode('latin-1')[:64] or 'none'!r}", code="unsupported_media_type")
        return None


def parse_body(raw: bytes, max_depth: int):
    """A request body as a JSON object, or a 400: strict UTF-8, no NaN/Infinity literals, integers
    of at most 4300 digits (Python's own limit), nesting at most `max_depth`, no lone surrogates
    (which `\\ud800` escapes can smuggle into text that no tokenizer can encode)."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {max_depth} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, over-long integers, bad UTF-8
        raise APIError(400, f"the request body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    stack = [(data, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > max_depth:
            raise APIError(400, f"the request body nests deeper than {max_depth} levels", code="invalid_json")
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            for t in (k, v):
                if isinstance(t, str):
                    try:
                        t.encode("utf-8")
                    except UnicodeEncodeError:
                        raise APIError(400, "the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-"
                                            "\\udfff escape), which is not text", code="invalid_json") from None
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
    return data


def finite(obj):
    """`obj` with every non-finite float replaced, so it serialises as strict JSON: -inf log-
    probabilities become -9999.0 (vLLM's floor), +inf 9999.0, NaN null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else math.copysign(9999.0, obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj) -> str:
    return json.dumps(finite(obj), allow_nan=False)


class StrictJSON(JSONResponse):
    """A JSON response that is strict JSON whatever floats it holds (see `finite`)."""

    def render(self, content) -> bytes:
        return dumps(content).encode("utf-8")


def create_app(engine: Engine, *, model_name: str = "base", tool_format: ToolFormat | None = None,
               limits: ServerLimits | None = None, adapter_roots: dict[str, str] | None = None,
               api_key: str | None = None, allow_adapter_updates: bool = False,
               protected_adapters: set[str] | frozenset[str] = frozenset()):
    """A FastAPI app serving `engine`; the engine thread starts and stops with the app.

    `api_key`: every route but `OPEN_PATHS` needs `Authorization: Bearer api_key`.
    `allow_adapter_updates`: enables `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (off:
    403). `protected_adapters` (and every bank entry) can never be unloaded: the server's own
    features (the tool selector, the skills) depend on them."""
    limits = limits if limits is not None else ServerLimits()
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string (or None for no authentication)")
    protected = frozenset(protected_adapters)
    ae = AsyncEngine(engine)
    serving = Serving(ae, model_name, tool_format)
    roots = dict(adapter_roots or {})
    counters = {"running": 0, "total": 0, "errors": 0, "cancelled": 0}

    @asynccontextmanager
    async def lifespan(app):
        ae.start()
        try:
            yield
        finally:
            ae.shutdown()

    app = FastAPI(title="kilolora", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = serving

    def count_error():
        counters["errors"] += 1

    app.add_middleware(_Gate, api_key=api_key, on_error=count_error)

    def error(err: APIError):
        counters["errors"] += 1
        return StrictJSON(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error(err)

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return error(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return error(APIError(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed"))

    def guard(route):
        """Answer a bug in a route with a 500 body. (Starlette's catch-all handler re-raises after
        answering, and uvicorn then drops the keep-alive connection another request may be using.)"""
        @functools.wraps(route)
        async def guarded(*args, **kw):
            try:
                out = await route(*args, **kw)
                # Rendered here, inside the guard, as strict JSON (no bare NaN / Infinity).
                return StrictJSON(out) if isinstance(out, dict) else out
            except APIError:
                raise
            except Exception as exc:
                log.exception("internal error in %s", route.__name__, exc_info=exc)
                raise APIError(500, f"internal error: {exc!r}", type="server_error", code="internal_error") from None

        return guarded

    async def body(request: Request, model):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise APIError(413, f"request body of {size} bytes is over the limit of {limits.max_body_bytes}",
                           code="request_too_large")

        async def read() -> bytes:
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limits.max_body_bytes:
                    raise APIError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                                   code="request_too_large")
            return bytes(raw)

        try:
            raw = await asyncio.wait_for(read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                           code="request_timeout") from None
        data = parse_body(raw, limits.max_json_depth)
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise validation_error(err) from None

    def admit(seqs: int):
        """Refuse a request whose `seqs` sequences would go over the in-flight limit."""
        if seqs > limits.max_running:
            raise APIError(400, f"the request asks for {seqs} sequences (prompts × n); the server runs at most "
                                f"{limits.max_running} at once", param="n", code="too_many_sequences")
        if counters["running"] + seqs > limits.max_running:
            raise APIError(503, f"the server is at its limit of {limits.max_running} sequences in flight; retry",
                           type="server_error", code="overloaded")

    async def cancellable(request: Request, coro):
        """Run `coro`; cancel it (closing its sequences) if the client goes away first."""
        task = asyncio.ensure_future(coro)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=limits.disconnect_poll_s)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    counters["cancelled"] += 1
                    task.cancel()
                    raise APIError(499, "client disconnected", code="client_closed")
        finally:
            if not task.done():
                task.cancel()

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    @guard
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    @guard
    async def models():
        now = created()
        data = [{"id": model_name, "object": "model", "created": now, "owned_by": "kilolora", "root": model_name,
                 "parent": None, "max_model_len": serving.max_model_len}]
        for name in await ae.call(lambda: list(engine.adapters)):  # the registry changes on the engine thread
            data.append({"id": name, "object": "model", "created": now, "owned_by": "kilolora",
                         "root": roots.get(name, name), "parent": model_name})
        return {"object": "list", "data": data}

    @app.get("/metrics")
    @guard
    async def metrics():
        st = await ae.stats()
        lines = [f"kilolora_kv_blocks_total {st['blocks_total']}", f"kilolora_kv_blocks_used {st['blocks_used']}",
                 f"kilolora_open_sequences {st['open_sequences']}", f"kilolora_prefix_cache_hits {st['prefix_hits']}",
                 f"kilolora_engine_steps {st['steps']}", f"kilolora_adapters {st['adapters']}",
                 f"kilolora_requests_running {counters['running']}", f"kilolora_requests_total {counters['total']}",
                 f"kilolora_requests_cancelled {counters['cancelled']}", f"kilolora_errors_total {counters['errors']}",
                 f"kilolora_engine_step_seconds {ae.step_seconds:.6f}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/completions")
    @guard
    async def completions(request: Request):
        req = await body(request, CompletionRequest)
        preps = await asyncio.to_thread(serving.prepare_completion, req)  # tokenizing: off the event loop
        k = len(preps) * req.n
        admit(k)
        rid, model, t = new_id("cmpl"), req.model, created()
        n_prompt = sum(len(p.ids) for p in preps)

        def choice_body(i: int, c: Choice) -> dict:
            return {"index": i, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "logprobs": completion_logprobs(serving.tokenizer, c.logprobs) if req.logprobs is not None else None}

        async def work(emit=None):
            runs = [serving.run(p, emit, first_index=j * req.n, group=rid) for j, p in enumerate(preps)]
            return [c for cs in await asyncio.gather(*runs) for c in cs]

        if not req.stream:
            choices = await tracked(cancellable(request, work()), k)
            return {"id": rid, "object": "text_completion", "created": t, "model": model,
                    "choices": [choice_body(i, c) for i, c in enumerate(choices)],
                    "usage": usage(n_prompt, choices, sum(c.counters.cached for c in choices))}

        offsets = [0] * (len(preps) * req.n)  # text_offset counts from the start of a choice, not of a chunk

        def chunk(i, text, lps, finish=None, stop_reason=None):
            lp = None
            if req.logprobs is not None and (lps or finish is None):
                lp = completion_logprobs(serving.tokenizer, lps or [], offsets[i])
                offsets[i] += sum(len(x) for x in lp["tokens"])
            return {"id": rid, "object": "text_completion", "created": t, "model": model,
                    "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lp,
                                 "stop_reason": stop_reason}]}

        def final(choices):
            out = [chunk(i, "", None, c.finish_reason, c.stop_reason) for i, c in enumerate(choices)]
            if req.stream_options is not None and req.stream_options.include_usage:
                out.append({"id": rid, "object": "text_completion", "created": t, "model": model, "choices": [],
                            "usage": usage(n_prompt, choices, sum(c.counters.cached for c in choices))})
            return out

        return StreamingResponse(sse(work, chunk, final, k), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    @guard
    async def chat(request: Request):
        req = await body(request, ChatRequest)
        prep = await asyncio.to_thread(serving.prepare_chat, req)
        admit(req.n)
        rid, model, t = new_id("chatcmpl"), req.model, created()

        def message(c: Choice) -> dict:
            m = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None}
            if c.tool_calls:
                m["tool_calls"] = [x.as_dict() for x in c.tool_calls]
            return m

        async def work(emit=None):
            return await serving.run(prep, emit, group=rid)

        if not req.stream:
            choices = await tracked(cancellable(request, work()), req.n)
            return {"id": rid, "object": "chat.completion", "created": t, "model": model,
                    "choices": [{"index": i, "message": message(c), "finish_reason": c.finish_reason,
                                 "stop_reason": c.stop_reason,
                                 "logprobs": chat_logprobs(serving.tokenizer, c.logprobs) if req.logprobs else None}
                                for i, c in enumerate(choices)],
                    "usage": usage(len(prep.ids), choices, sum(c.counters.cached for c in choices))}

        def chunk(i, text, lps, finish=None, delta=None):
            d = delta if delta is not None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": t, "model": model,
                    "choices": [{"index": i, "delta": d, "finish_reason": finish,
                                 "logprobs": chat_logprobs(serving.tokenizer, lps or []) if req.logprobs and lps
                                 else None}]}

        def first():
            return [chunk(i, "", None, delta={"role": "assistant", "content": ""}) for i in range(req.n)]

        def final(choices):
            out = []
            for i, c in enumerate(choices):
                if c.tool_calls:
                    calls = [{"index": k, **x.as_dict()} for k, x in enumerate(c.tool_calls)]
                    out.append(chunk(i, "", None, delta={"tool_calls": calls}))
                out.append(chunk(i, "", None, c.finish_reason, delta={}))
            if req.stream_options is not None and req.stream_options.include_usage:
                out.append({"id": rid, "object": "chat.completion.chunk", "created": t, "model": model,
                            "choices": [], "usage": usage(len(prep.ids), choices,
                                                          sum(c.counters.cached for c in choices))})
            return out

        return StreamingResponse(sse(work, chunk, final, req.n, first), media_type="text/event-stream")

    async def tracked(coro, seqs: int):
        counters["running"] += seqs
        counters["total"] += 1
        try:
            return await coro
        finally:
            counters["running"] -= seqs

    async def sse(work, chunk, final, seqs: int, first=None) -> AsyncIterator[str]:
        """Server-sent events: the choices' chunks as they come, the final chunks, `[DONE]`.
        If the client goes away, the generator is closed or cancelled: `work` is cancelled and
        its sequences are closed."""
        q: asyncio.Queue = asyncio.Queue()

        async def emit(i, text, lps):
            await q.put(chunk(i, text, lps))

        async def produce():
            try:
                choices = await work(emit)
                for c in final(choices):
                    await q.put(c)
            except APIError as err:
                counters["errors"] += 1
                await q.put(err.body())
            except Exception as err:  # the stream already started: report the failure in it
                log.exception("internal error in a stream", exc_info=err)
                counters["errors"] += 1
                await q.put(APIError(500, f"internal error: {err!r}", type="server_error").body())
            await q.put(None)

        counters["running"] += seqs
        counters["total"] += 1
        task = asyncio.ensure_future(produce())
        try:
            for c in first() if first is not None else []:
                yield f"data: {dumps(c)}\n\n"
            while True:
                item = await q.get()
                if item is None:
                    break
                yield f"data: {dumps(item)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            counters["running"] -= seqs
            if not task.done():
                counters["cancelled"] += 1
                task.cancel()

    # -------------------------------------------------------------- adapters
    def updates_allowed():
        if not allow_adapter_updates:
            raise APIError(403, "runtime adapter updates are off on this server (start it with "
                                "--allow-adapter-updates to enable load_lora_adapter / unload_lora_adapter)",
                           code="adapter_updates_disabled")

    @app.post("/v1/load_lora_adapter")
    @guard
    async def load_lora(request: Request):
        updates_allowed()
        req = await body(request, LoadLoraRequest)
        if req.lora_name == model_name or req.lora_name in protected:
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
        if await ae.call(lambda: req.lora_name in engine.registry):
            raise APIError(400, f"The lora adapter '{req.lora_name}' has already been loaded.", param="lora_name")
        try:
            # Read and check the files on a worker thread (configs are size-bounded before they are
            # read); only the copy into the registry's stacks runs on the engine thread.
            adapter = await asyncio.to_thread(load_adapter, path, req.lora_name)
            await ae.call(engine.add_adapter, req.lora_name, adapter)
        except (ValueError, FileNotFoundError, KeyError, OSError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise APIError(400, f"cannot load {req.lora_path!r}: {msg}", param="lora_path") from None
        roots[req.lora_name] = str(path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    @guard
    async def unload_lora(request: Request):
        updates_allowed()
        req = await body(request, UnloadLoraRequest)

        def unload():  # on the engine thread, where the registry changes
            if req.lora_name not in engine.registry:
                raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name",
                               code="model_not_found")
            if req.lora_name in protected or engine.registry.get(req.lora_name).kind == "bank":
                raise APIError(403, f"the adapter {req.lora_name!r} is part of the server's own features or its "
                                    f"bank and cannot be unloaded", param="lora_name", code="adapter_protected")
            try:
                engine.unload_adapter(req.lora_name)
            except ValueError as err:
                raise APIError(409, str(err), param="lora_name", code="adapter_in_use") from None

        await ae.call(unload)
        roots.pop(req.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    # -------------------------------------------------------------- tokenizer
    @app.post("/tokenize")
    @guard
    async def tokenize(request: Request):
        req = await body(request, TokenizeRequest)
        tok = serving.tokenizer

        def work():  # tokenizing a large body takes a while: off the event loop
            if req.messages is not None:  # rendered as the chat endpoint renders them, tool calls included
                chat = ChatRequest(model=model_name, messages=req.messages)
                serving.check_contents(chat)
                text, _, _ = serving.render_chat(chat, req.add_generation_prompt, req.continue_final_message)
            else:
                text = req.prompt
            serving.check_length(text, "prompt" if req.messages is None else "messages")
            return text, tok.encode(text, add_special_tokens=req.add_special_tokens)

        text, ids = await asyncio.to_thread(work)
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids, "prompt": text}

    @app.post("/detokenize")
    @guard
    async def detokenize(request: Request):
        req = await body(request, DetokenizeRequest)
        vocab = engine.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": serving.tokenizer.decode(req.tokens)}

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", header_timeout_s: float = 10.0,
          max_connections: int = 1024) -> None:
    """Run the app with uvicorn until interrupted. A connection must finish sending a request's
    headers within `header_timeout_s` (uvicorn itself would wait forever: slowloris), and at most
    `max_connections` are served at once (more get 503)."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("the server needs uvicorn: pip install 'uvicorn>=0.29'") from err
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                http=header_timeout_protocol(header_timeout_s), limit_concurrency=max_connections)


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that sends part of a request's headers (or
    nothing at all after connecting) and then stalls for `timeout_s`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # headers still incomplete
                if self._header_timer is None:
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._header_timer = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self):
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


def local_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a local directory (nothing is downloaded)")
    return p
