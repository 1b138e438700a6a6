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
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
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
from .openai_serving import Choice, Serving, chat_logprobs, completion_logprobs, created, new_id, usage
from .tool_calls import ToolFormat

log = logging.getLogger("kilolora.server")


@dataclass
class ServerLimits:
    """What one request may ask of the server."""

    max_body_bytes: int = 1 << 20
    """larger request bodies get 413"""
    max_running: int = 512
    """requests in flight at once; more get 503 (retry later)"""
    disconnect_poll_s: float = 0.25
    """how often a non-streaming request checks whether its client is still there"""


def create_app(engine: Engine, *, model_name: str = "base", tool_format: ToolFormat | None = None,
               limits: ServerLimits | None = None, adapter_roots: dict[str, str] | None = None):
    """A FastAPI app serving `engine`; the engine thread starts and stops with the app."""
    limits = limits if limits is not None else ServerLimits()
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

    def error(err: APIError):
        counters["errors"] += 1
        return JSONResponse(err.body(), status_code=err.status)

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
                return await route(*args, **kw)
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
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                           code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise validation_error(err) from None

    def admit():
        if counters["running"] >= limits.max_running:
            raise APIError(503, f"the server is at its limit of {limits.max_running} requests in flight; retry",
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
        preps = serving.prepare_completion(req)
        admit()
        rid, model, t = new_id("cmpl"), req.model, created()
        n_prompt = sum(len(p.ids) for p in preps)

        def choice_body(i: int, c: Choice) -> dict:
            return {"index": i, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "logprobs": completion_logprobs(serving.tokenizer, c.logprobs) if req.logprobs is not None else None}

        async def work(emit=None):
            runs = [serving.run(p, emit, first_index=k * req.n) for k, p in enumerate(preps)]
            return [c for cs in await asyncio.gather(*runs) for c in cs]

        if not req.stream:
            choices = await tracked(cancellable(request, work()))
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

        return StreamingResponse(sse(work, chunk, final), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    @guard
    async def chat(request: Request):
        req = await body(request, ChatRequest)
        prep = serving.prepare_chat(req)
        admit()
        rid, model, t = new_id("chatcmpl"), req.model, created()

        def message(c: Choice) -> dict:
            m = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None}
            if c.tool_calls:
                m["tool_calls"] = [x.as_dict() for x in c.tool_calls]
            return m

        async def work(emit=None):
            return await serving.run(prep, emit)

        if not req.stream:
            choices = await tracked(cancellable(request, work()))
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

        return StreamingResponse(sse(work, chunk, final, first), media_type="text/event-stream")

    async def tracked(coro):
        counters["running"] += 1
        counters["total"] += 1
        try:
            return await coro
        finally:
            counters["running"] -= 1

    async def sse(work, chunk, final, first=None) -> AsyncIterator[str]:
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

        counters["running"] += 1
        counters["total"] += 1
        task = asyncio.ensure_future(produce())
        try:
            for c in first() if first is not None else []:
                yield f"data: {json.dumps(c)}\n\n"
            while True:
                item = await q.get()
                if item is None:
                    break
                yield f"data: {json.dumps(item)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            counters["running"] -= 1
            if not task.done():
                counters["cancelled"] += 1
                task.cancel()

    # -------------------------------------------------------------- adapters
    @app.post("/v1/load_lora_adapter")
    @guard
    async def load_lora(request: Request):
        req = await body(request, LoadLoraRequest)
        path = Path(req.lora_path)
        if "://" in req.lora_path or not path.is_absolute() and not path.exists():
            raise APIError(400, f"lora_path must be a local directory; {req.lora_path!r} is not one (adapters are "
                                f"never downloaded)", param="lora_path")
        if not path.is_dir():
            raise APIError(400, f"lora_path {req.lora_path!r} is not a directory", param="lora_path")
        if req.lora_name in engine.registry or req.lora_name == model_name:
            raise APIError(400, f"The lora adapter '{req.lora_name}' has already been loaded.", param="lora_name")
        if (path / "bank.json").is_file():
            raise APIError(400, f"{req.lora_path!r} is a compressed bank: banks are served from the start "
                                f"(`kilolora serve --bank DIR`); this endpoint loads PEFT adapter directories",
                           param="lora_path")
        try:
            await ae.call(engine.load_adapter, req.lora_name, path)
        except (ValueError, FileNotFoundError, KeyError, OSError) as err:
            raise APIError(400, f"cannot load {req.lora_path!r}: {err}", param="lora_path") from None
        roots[req.lora_name] = str(path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    @guard
    async def unload_lora(request: Request):
        req = await body(request, UnloadLoraRequest)
        if req.lora_name not in engine.registry:
            raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        try:
            await ae.call(engine.unload_adapter, req.lora_name)
        except ValueError as err:
            raise APIError(409, str(err), param="lora_name", code="adapter_in_use") from None
        roots.pop(req.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    # -------------------------------------------------------------- tokenizer
    @app.post("/tokenize")
    @guard
    async def tokenize(request: Request):
        req = await body(request, TokenizeRequest)
        tok = serving.tokenizer
        if req.messages is not None:  # rendered as the chat endpoint renders them, tool calls included
            chat = ChatRequest(model=model_name, messages=req.messages)
            serving.check_contents(chat)
            text, _, _ = serving.render_chat(chat, req.add_generation_prompt, req.continue_final_message)
        else:
            text = req.prompt
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
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


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the app with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("the server needs uvicorn: pip install 'uvicorn>=0.29'") from err
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def local_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a local directory (nothing is downloaded)")
    return p
