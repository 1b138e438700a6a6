"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine and its adapters: the app
and its routes, each one line into `handlers.py` (as vLLM keeps its `api_server.py` thin).

    GET  /v1/models                  the base (`base`) and every adapter (`parent: base`)
    GET  /v1/models/{id}             one of them (`base`, `NAME`, `base:NAME`; 404 model_not_found)
    POST /v1/completions             prompt(s) -> text; stream, n, logprobs, stop, seed, ...
    POST /v1/chat/completions        messages -> message; stream, tools / tool_calls, logprobs, ...
    POST /v1/responses               the Responses API: input items -> output items; stream, function tools,
                                     previous_response_id (stored in memory, bounded); see responses_api.py
    GET, DELETE /v1/responses/{id}   a stored response
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}: a local PEFT directory or bank
    POST /v1/unload_lora_adapter     {"lora_name"}
    POST /tokenize, /detokenize      vLLM's shapes (the HTTP orchestrator backend renders chats here)
    GET  /health, /ping, /version    liveness (vLLM's /ping too); {"version": ...}
    GET  /metrics                    Prometheus text (vLLM's names: requests, tokens, latency, TTFT)

`model` picks the adapter: `base`, `NAME` or `base:NAME`. Every request runs in the engine's one
continuous batch. Every failure is an OpenAI-shaped error body with its status code; a client that
disconnects (mid-stream or while waiting) has its sequences closed, which frees their blocks.

What one client can do to the others is bounded (`ServerLimits`, `boundary.py`): bodies are size-,
time- and depth-limited and must be JSON (`Content-Type: application/json`, so no cross-site form
can drive the API); sequences in flight (prompts × n) are counted against one limit and share
engine steps fairly between requests; with an API key every route but `/health`, `/ping`,
`/version` and `/metrics` needs `Authorization: Bearer KEY` (vLLM leaves those open too);
adapters change at run time only with `allow_adapter_updates`, and never those the server's own
features use. Unknown request fields are accepted, logged and named in the
`x-kilolora-ignored-fields` header (as vLLM logs them); see `protocol.py` for the spec's fields.

The package: `api_server.py` (this), `handlers.py` (what each route does), `serving.py` (requests
into engine work), `tool_loop.py` (the markup format's proposer loop), `responses.py` (every
response body), `protocol.py` (request models, errors), `tool_formats.py`, `boundary.py`
(limits, gate, body parsing, strict JSON), `metrics.py`, `responses_api.py` and
`responses_protocol.py` (the Responses API over the chat path: conversion, storage, events; its
request models).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path

try:
    from fastapi import FastAPI, Request
except ImportError as err:  # pragma: no cover - the dependency is declared; this names the fix
    raise ImportError("the server needs fastapi and uvicorn: pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from err

from ..async_engine import AsyncEngine, EngineClient
from ..engine import Engine
from .boundary import Gate, ServerLimits, StrictJSON, guard, name_ignored
from .handlers import Handlers
from .metrics import ServerMetrics
from .protocol import APIError
from .serving import Serving
from .tool_formats import ToolFormat

__all__ = ["ServerLimits", "create_app", "local_dir", "serve"]


def create_app(engine: Engine | EngineClient, *, model_name: str = "base", tool_format: ToolFormat | None = None,
               limits: ServerLimits | None = None, adapter_roots: dict[str, str] | None = None,
               api_key: str | None = None, allow_adapter_updates: bool = False,
               protected_adapters: set[str] | frozenset[str] = frozenset()):
    """A FastAPI app serving `engine`: an `Engine` (run on a thread of this process) or an engine
    client (`engine_process.EngineProcess`: the engine in a process of its own, which `kilolora
    serve` uses); it starts with the app, and stops with it.

    `api_key`: every route but `OPEN_PATHS` needs `Authorization: Bearer api_key`.
    `allow_adapter_updates`: enables `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (off:
    403). `protected_adapters` (and every bank entry) can never be unloaded: the server's own
    features (the tool selector, the skills) depend on them."""
    limits = limits if limits is not None else ServerLimits()
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string (or None for no authentication)")
    ae = engine if isinstance(engine, EngineClient) else AsyncEngine(engine)
    serving = Serving(ae, model_name, tool_format)
    counters = ServerMetrics(model_name, ae.engine.max_model_len)
    h = Handlers(serving, limits, counters, model_name=model_name, adapter_roots=dict(adapter_roots or {}),
                 allow_adapter_updates=allow_adapter_updates, protected=frozenset(protected_adapters))

    @asynccontextmanager
    async def lifespan(app):
        ae.start()
        try:
            yield
        finally:
            ae.shutdown()

    app = FastAPI(title="kilolora", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = serving
    app.state.responses_store = h.stored  # its limits can be set before the app serves

    def count_error():
        counters.errors += 1

    app.add_middleware(Gate, api_key=api_key, on_error=count_error)

    def error(err: APIError):
        counters.errors += 1
        return StrictJSON(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        response = error(err)
        name_ignored(request, response)  # the body was read before the request was refused
        return response

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return error(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return error(APIError(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed"))

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    @guard
    async def health():
        return await h.health()

    @app.get("/ping")
    @guard
    async def ping():
        return await h.ping()

    @app.get("/version")
    @guard
    async def version():
        return await h.version()

    @app.get("/v1/models")
    @guard
    async def models():
        return await h.models()

    @app.get("/v1/models/{model_id:path}")  # adapter names hold `/`, and `base:NAME` a `:`
    @guard
    async def model(model_id: str):
        return await h.model(model_id)

    @app.get("/metrics")
    @guard
    async def metrics():
        return await h.render_metrics()

    @app.post("/v1/completions")
    @guard
    async def completions(request: Request):
        return await h.completions(request)

    @app.post("/v1/chat/completions")
    @guard
    async def chat(request: Request):
        return await h.chat(request)

    @app.post("/v1/responses")
    @guard
    async def responses(request: Request):
        return await h.responses(request)

    @app.get("/v1/responses/{response_id}")
    @guard
    async def get_response(response_id: str, request: Request):
        return await h.get_response(response_id, request)

    @app.delete("/v1/responses/{response_id}")
    @guard
    async def delete_response(response_id: str):
        return await h.delete_response(response_id)

    @app.post("/v1/load_lora_adapter")
    @guard
    async def load_lora(request: Request):
        return await h.load_lora(request)

    @app.post("/v1/unload_lora_adapter")
    @guard
    async def unload_lora(request: Request):
        return await h.unload_lora(request)

    @app.post("/tokenize")
    @guard
    async def tokenize(request: Request):
        return await h.tokenize(request)

    @app.post("/detokenize")
    @guard
    async def detokenize(request: Request):
        return await h.detokenize(request)

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
