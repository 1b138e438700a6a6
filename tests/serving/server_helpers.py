"""What the server suites share (tests/serving/test_server_*.py): the embedded world, its prompts
and tool, and the client-side helpers that render prompts, compute in-process references, read
`/metrics` and SSE streams, and check OpenAI-shaped errors. Their fixtures are in conftest.py.

The suites test the OpenAI-compatible server as a client sees it: the official `openai` client (and
raw HTTP where the client would refuse to send a bad request) against `kilolora serve` running as
a real subprocess on localhost, with the embedded default world. References: greedy text, token
counts and logprobs come from the in-process `serving.Engine` of the same world and from its
tokenizer; tool results from Python arithmetic. Every check that an adapter changes something
first checks that its output differs from the base's.
"""

from __future__ import annotations

import json
import re
import time

from serving import SamplingParams
from skills.world import World

WORLD = World.load()
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
PROBLEM = "37*49+12"
TASK = ("replace-lx", "replace: hello")  # a task adapter and a prompt its task needs it for
UNSURE = "shift: hello"  # the base cannot know k for a bare `shift:`: sampled at T = 1 it varies with the seed


def render(tok, content: str) -> str:
    """The chat prompt of one user message, as the world's chat template writes it."""
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def reference(engine, prompt: str, adapter: str | None, max_tokens: int, **kw):
    """The in-process engine's greedy completion of `prompt` under `adapter`."""
    [c] = engine.generate(prompt, None if adapter == "base" else adapter,
                          SamplingParams(temperature=0, max_tokens=max_tokens, **kw))
    return c


def chat(client, model: str, content: str, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 48)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def metrics(http) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^(kilolora_\w+) (\S+)$", http.get("/metrics").text, re.M)}


def settled(http, timeout: float = 10.0) -> dict[str, float]:
    """/metrics once no request runs and no sequence is open (cancellation is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if m["kilolora_requests_running"] == 0 and m["kilolora_open_sequences"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def sse(lines) -> list:
    """The `data:` payloads of a server-sent event stream (JSON, or the literal `[DONE]`)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def assert_error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    """An OpenAI-shaped error body with this status (and code / param when given)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error"), err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err
