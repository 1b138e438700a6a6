"""`create_app` with tight `ServerLimits`, served by uvicorn in a thread of the test: requests past
the in-flight limit get 503 and the running ones are not disturbed; bodies past the size limit 413."""

from __future__ import annotations

import threading
import time

import httpx2 as httpx
import pytest

from serving.openai.api_server import ServerLimits, create_app
from skills.world import World
from tests.helpers import free_port


@pytest.fixture(scope="module")
def url():
    import uvicorn

    port = free_port()
    app = create_app(World.load().engine(kv_cache_tokens=4096), limits=ServerLimits(max_running=1, max_body_bytes=2048))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield base
    server.should_exit = True
    thread.join(timeout=15)


def test_past_the_in_flight_limit_requests_get_503_and_the_running_one_finishes(url):
    long = {"model": "base", "prompt": "<bos><|user|>1+2<|end|><|assistant|>", "max_tokens": 300, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()
            next(lines)  # it is generating
            r = http.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        r = http.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_bodies_past_the_size_limit_get_413(url):
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x" * 4000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x" * 100, "max_tokens": 1})
    assert r.status_code == 200
