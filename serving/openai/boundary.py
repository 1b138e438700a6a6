"""What crosses the HTTP boundary, and the checks on it: the limits one request must keep
(`ServerLimits`), the API key and JSON-only gate in front of every route, reading and parsing a
request body (size-, time- and depth-limited, strict JSON; unknown fields logged and named in the
`x-kilolora-ignored-fields` header, as vLLM logs them), strict JSON out, and the guard that turns a
bug in a route into a 500 body.

A browser can send `text/plain` or form posts cross-site without a preflight; it cannot send
`Content-Type: application/json`, so JSON-only bodies keep web pages from driving the API.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
from dataclasses import dataclass
from urllib.parse import quote

from pydantic import ValidationError

try:
    from fastapi import Request
    from fastapi.responses import JSONResponse
except ImportError as err:  # pragma: no cover - the dependency is declared; this names the fix
    raise ImportError("the server needs fastapi and uvicorn: pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from err

from .protocol import APIError, ignored_fields, validation_error

log = logging.getLogger("kilolora.server")


@dataclass
class ServerLimits:
    """What one request may ask of the server."""

    max_body_bytes: int = 1 << 20
    """larger request bodies get 413"""
    max_running: int = 512
    """sequences in flight at once (each request counts prompts × n); more get 503 (retry later),
    and one request asking for more than this alone gets 400"""
    body_timeout_s: float = 30.0
    """a request body must arrive within this (half-sent bodies get 408, not a held connection)"""
    max_json_depth: int = 64
    """deepest nesting of a request body's JSON"""


OPEN_PATHS = ("/health", "/ping", "/version", "/metrics")
"""routes that need no API key (liveness probes and scrapers; vLLM leaves these open too)"""

IGNORED_HEADER = "x-kilolora-ignored-fields"
"""names the request fields the server accepted but ignored (unknown to it), comma-separated"""
MAX_IGNORED_NAMED = 32


class Gate:
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


def guard(route):
    """Answer a bug in a route with a 500 body. (Starlette's catch-all handler re-raises after
    answering, and uvicorn then drops the keep-alive connection another request may be using.)
    A response to a body with ignored fields names them (`IGNORED_HEADER`)."""
    @functools.wraps(route)
    async def guarded(*args, **kw):
        try:
            out = await route(*args, **kw)
            # Rendered here, inside the guard, as strict JSON (no bare NaN / Infinity).
            out = StrictJSON(out) if isinstance(out, dict) else out
        except APIError:
            raise
        except Exception as exc:
            log.exception("internal error in %s", route.__name__, exc_info=exc)
            raise APIError(500, f"internal error: {exc!r}", type="server_error", code="internal_error") from None
        request = kw.get("request")
        if request is not None:
            name_ignored(request, out)
        return out

    return guarded


def name_ignored(request: Request, response) -> None:
    """Add `IGNORED_HEADER` to `response` when `read_body` dropped fields of `request`'s body."""
    names = getattr(request.state, "ignored_fields", None)
    if names:
        # Field names are the client's text: percent-encoded, they cannot break the header.
        shown = [quote(n[:100], safe="_.-:[]") for n in names[:MAX_IGNORED_NAMED]]
        more = len(names) - len(shown)
        response.headers[IGNORED_HEADER] = ", ".join(shown + ([f"+{more} more"] if more > 0 else []))


async def read_body(request: Request, model, limits: ServerLimits):
    """The request body as a `model` (a pydantic request), or an APIError: 413 over
    `limits.max_body_bytes`, 408 when it does not arrive within `limits.body_timeout_s`, 400 for
    bad JSON or a value the model refuses. Fields the model does not know are dropped, logged (as
    vLLM logs them) and kept on `request.state.ignored_fields` for `name_ignored`; the body's size
    is kept on `request.state.body_bytes`."""
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
    request.state.body_bytes = len(raw)
    data = parse_body(raw, limits.max_json_depth)
    try:
        req = model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None
    ignored = ignored_fields(req)
    if ignored:
        request.state.ignored_fields = ignored
        more = len(ignored) - MAX_IGNORED_NAMED
        # repr: a client's field name cannot forge a log line
        log.warning("The following fields were present in the request but ignored: %r%s",
                    [n[:100] for n in ignored[:MAX_IGNORED_NAMED]], f" (+{more} more)" if more > 0 else "")
    return req
