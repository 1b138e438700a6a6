"""`POST /v1/completions`: server-sent events ending with `[DONE]`, and logprobs (legacy and chat)
equal to the in-process engine's for n choices (see server_helpers.py)."""

from __future__ import annotations

import pytest

from tests.serving.server_helpers import PROBLEM, UNSURE, chat, n_tokens, reference, render, sse


def test_streamed_completion_is_sse_ending_with_done(http, tok):
    prompt = render(tok, PROBLEM)
    body = {"model": "base", "prompt": prompt, "temperature": 0, "max_tokens": 48, "logprobs": 2}
    whole = http.post("/v1/completions", json=body).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=streamed) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == n_tokens(tok, whole["choices"][0]["text"]) + 1
    # The chunks' logprobs add up to the whole's, text offsets counted from the start of the text.
    want = whole["choices"][0]["logprobs"]
    assert len(want["tokens"]) == whole["usage"]["completion_tokens"]
    assert chunks[-1]["choices"][0]["logprobs"] is None  # the closing chunk carries no tokens
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks[:-1] for x in c["choices"][0]["logprobs"][key]] == want[key], key


def test_logprobs_equal_the_engine_and_n_choices_have_their_shapes(client, engine, tok):
    prompt = render(tok, PROBLEM)
    want = reference(engine, prompt, None, 24, logprobs=3)
    r = chat(client, "base", PROBLEM, max_tokens=24, n=2, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.content == want.text
        got = c.logprobs.content
        assert [x.token for x in got] == [tok.decode([t.token], skip_special_tokens=False) for t in want.logprobs]
        for x, t in zip(got, want.logprobs):
            assert x.logprob == pytest.approx(t.logprob, abs=1e-4)
            assert [y.token for y in x.top_logprobs] == [tok.decode([i], skip_special_tokens=False) for i, _ in t.top]
            assert [y.logprob for y in x.top_logprobs] == pytest.approx([lp for _, lp in t.top], abs=1e-4)
            assert x.bytes == list(x.token.encode())
    assert r.usage.completion_tokens == 2 * len(want.token_ids)

    # Sampled choices: one logprob entry per generated token, top_logprobs of the asked size.
    r = chat(client, "base", UNSURE, temperature=1, seed=3, n=3, logprobs=True, top_logprobs=2, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # each choice samples on its own
    total = 0
    for c in r.choices:
        entries = c.logprobs.content
        total += len(entries)
        assert "".join(x.token for x in entries).startswith(c.message.content)
        assert all(len(x.top_logprobs) == 2 and x.logprob <= 0 for x in entries)
        assert all(x.top_logprobs[0].logprob >= x.top_logprobs[1].logprob for x in entries)
    assert total == r.usage.completion_tokens

    # Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset per choice.
    r = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=24, n=2, logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        lp = c.logprobs
        assert c.text == want.text
        assert lp.tokens == [tok.decode([t.token], skip_special_tokens=False) for t in want.logprobs]
        assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-4)
        assert all(len(top) == 3 for top in lp.top_logprobs)
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
