"""What a bad or leaving client does to the others: OpenAI-shaped errors while a good stream runs,
cancellation of clients that go away, and 32 concurrent streams; checked on `/metrics`
(see server_helpers.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from tests.serving.server_helpers import CALCULATOR, PROBLEM, TASK, assert_error, chat, n_tokens, reference, render, \
    settled, sse


def test_bad_requests_get_openai_errors_and_disturb_no_one(http, engine, tok):
    """Each bad request gets its status and an OpenAI error body while a good stream runs; the
    good stream then finishes with the engine's text."""
    msg = [{"role": "user", "content": PROBLEM}]
    long_prompt = "a" * (engine.max_model_len + 10)
    bad = [  # (path, JSON body or raw bytes, status, code, param)
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
        ("/v1/completions", b"", 400, "invalid_json", None),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
        ("/v1/chat/completions", {"model": "nope", "messages": msg}, 404, "model_not_found", "model"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
        ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
        ("/v1/chat/completions", {"model": "base", "messages": "hi"}, 400, "invalid_value", "messages"),
        ("/v1/chat/completions", {"model": "base", "messages": msg, "temperature": "hot"}, 400, "invalid_value",
         "temperature"),
        # (an unknown field such as "frobnicate" is accepted and named in a header now, as vLLM does: issue 18)
        ("/v1/chat/completions", {"model": "base", "messages": msg, "modalities": ["audio"]}, 400, "unsupported_value",
         "modalities"),
        ("/v1/completions", {"model": "base", "prompt": long_prompt}, 400, "context_length_exceeded", "prompt"),
        ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": long_prompt}]}, 400,
         "context_length_exceeded", "messages"),
        ("/v1/chat/completions", {"model": "base", "messages": msg, "max_tokens": engine.max_model_len}, 400,
         "context_length_exceeded", "max_tokens"),
        ("/v1/completions", {"model": "base", "prompt": "x", "n": -1}, 400, "invalid_value", "n"),
        ("/v1/chat/completions", {"model": "base", "messages": msg, "n": 0}, 400, "invalid_value", "n"),
        ("/v1/completions", {"model": "base", "prompt": "x", "logprobs": 1000}, 400, "invalid_value", "logprobs"),
        ("/v1/completions", {"model": "base", "prompt": [engine.config.vocab_size]}, 400, None, "prompt"),
        ("/v1/chat/completions", {"model": "base", "messages": msg + [{"role": "tool", "tool_call_id": "x",
                                                                        "content": "1"}]}, 400, None, None),
        ("/v1/chat/completions", {"model": "base", "messages": msg, "tools": [CALCULATOR],
                                  "tool_choice": {"type": "function", "function": {"name": "weather"}}}, 400, None,
         None),
        ("/v1/chat/completions", {"model": "base", "messages": msg, "stream_options": {"include_usage": True}}, 400,
         "invalid_value", None),  # stream_options without stream
        ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413,
         "request_too_large", None),
    ]
    body = {"model": TASK[0], "messages": [{"role": "user", "content": PROBLEM}], "temperature": 0,
            "max_tokens": 64, "ignore_eos": True, "stream": True}
    want = reference(engine, render(tok, PROBLEM), TASK[0], 64, ignore_eos=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as good:
        lines = good.iter_lines()
        head = [next(lines) for _ in range(4)]  # the request is running on the engine from here on
        for path, payload, status, code, param in bad:
            if isinstance(payload, bytes):
                r = http.post(path, content=payload, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=payload)
            assert_error(r, status, code, param)
        # A body over the limit sent without content-length (chunked) is cut off while it is read.
        r = http.post("/v1/completions", content=(b"x" * 65536 for _ in range(20)),
                      headers={"content-type": "application/json"})
        assert_error(r, 413, "request_too_large")
        assert_error(http.get("/v1/no-such-route"), 404)
        assert_error(http.get("/v1/chat/completions"), 405)
        events = sse([*head, *lines])
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == want.text
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_client_that_gives_up_is_cancelled(server, http, engine, tok):
    """A non-streamed request whose client goes away is cancelled and its sequence closed."""
    before = settled(http)
    max_tokens = engine.max_model_len - n_tokens(tok, render(tok, PROBLEM))
    body = {"model": "base", "messages": [{"role": "user", "content": PROBLEM}], "max_tokens": max_tokens,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.1))
    after = settled(http)
    assert after["kilolora_requests_cancelled"] == before["kilolora_requests_cancelled"] + 1
    assert after["kilolora_open_sequences"] == after["kilolora_requests_running"] == 0
    assert after["kilolora_kv_blocks_used"] == 0
    # it stopped when the client went away, well before its max_tokens (one step per token)
    assert after["kilolora_engine_steps"] - before["kilolora_engine_steps"] < 0.8 * max_tokens


def test_clients_that_leave_at_once_leak_nothing(server, http):
    """Streams closed as soon as their headers arrive, while the engine is busy stepping another
    request: each is cancelled while its sequences are still being opened or forked, and none of
    them may stay open."""
    before = settled(http)
    busy = {"model": "base", "messages": [{"role": "user", "content": PROBLEM}], "max_tokens": 300,
            "ignore_eos": True, "n": 8, "temperature": 1, "stream": True}

    def leave(i: int) -> None:
        body = {"model": TASK[0], "messages": [{"role": "user", "content": f"shift: abc{i}"}], "n": 2,
                "max_tokens": 20, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", server + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200

    with httpx.Client(timeout=60) as c, c.stream("POST", server + "/v1/chat/completions", json=busy) as r:
        lines = r.iter_lines()
        next(lines)
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(leave, range(20)))
    after = settled(http)
    assert after["kilolora_open_sequences"] == after["kilolora_requests_running"] == 0
    assert after["kilolora_kv_blocks_used"] == 0
    assert after["kilolora_requests_cancelled"] >= before["kilolora_requests_cancelled"] + 21


def test_32_concurrent_streams_and_one_disconnect(client, http):
    jobs = [("base", PROBLEM), TASK, ("shift-1", "shift: world"), ("add-2", "add: 3071"), ("base", "12*34-5"),
            ("base:shift-7", "shift: abc"), ("shift-3", "shift: xyz"), ("base", "88*9+1")]
    refs = {job: chat(client, *job).choices[0].message.content for job in jobs}
    assert len(set(refs.values())) == len(jobs)
    before = settled(http)
    start = threading.Barrier(33)

    def stream(i: int) -> tuple[tuple[str, str], str]:
        job = jobs[i % len(jobs)]
        start.wait()
        s = chat(client, *job, stream=True)
        return job, "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    def disconnect() -> int:
        start.wait()
        s = chat(client, "base", PROBLEM, stream=True, max_tokens=400, extra_body={"ignore_eos": True})
        got = 0
        for ch in s:
            got += bool(ch.choices and ch.choices[0].delta.content)
            if got == 3:
                break
        s.close()
        return got

    with ThreadPoolExecutor(33) as pool:
        leaver = pool.submit(disconnect)
        results = list(pool.map(stream, range(32)))
        assert leaver.result() == 3
    for job, text in results:
        assert text == refs[job], job
    after = settled(http)
    assert after["kilolora_open_sequences"] == 0 and after["kilolora_requests_running"] == 0
    assert after["kilolora_kv_blocks_used"] == 0
    assert after["kilolora_requests_cancelled"] >= before["kilolora_requests_cancelled"] + 1
    assert after["kilolora_requests_total"] >= before["kilolora_requests_total"] + 33
