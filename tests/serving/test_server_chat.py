"""`POST /v1/chat/completions` (and `/v1/completions` on the rendered prompt) against the in-process
engine: greedy text and usage, streaming, the prefix cache, seeds (see server_helpers.py)."""

from __future__ import annotations

import time

import pytest

from tests.serving.server_helpers import PROBLEM, TASK, UNSURE, chat, n_tokens, reference, render


@pytest.mark.parametrize("model,content", [("base", PROBLEM), TASK])
def test_chat_and_completion_equal_the_in_process_engine(client, engine, tok, model, content):
    prompt = render(tok, content)
    want = reference(engine, prompt, model, 48)
    assert want.text and want.finish_reason == "stop"
    r = chat(client, model, content)
    assert r.object == "chat.completion" and r.model == model and len(r.choices) == 1
    c = r.choices[0]
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", want.text, "stop")
    assert c.message.tool_calls is None
    assert r.usage.prompt_tokens == n_tokens(tok, prompt)
    assert r.usage.completion_tokens == len(want.token_ids) == n_tokens(tok, want.text) + 1  # + the end token
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The completions endpoint on the rendered prompt (its special tokens parse as such) says the same.
    r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=48)
    assert r.object == "text_completion"
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_tokens(tok, prompt), len(want.token_ids))
    # A completion cut by max_tokens: finish_reason "length", exactly max_tokens tokens of text.
    r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=3)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (tok.decode(want.token_ids[:3]), "length")
    assert r.usage.completion_tokens == 3 == n_tokens(tok, r.choices[0].text)


def test_streamed_chat_equals_the_non_streamed_text(client, tok):
    for model, content in [("base", PROBLEM), TASK]:
        whole = chat(client, model, content)
        chunks = list(chat(client, model, content, stream=True, stream_options={"include_usage": True}))
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        *body, last = chunks
        assert last.choices == [] and last.usage is not None  # the include_usage chunk ends the stream
        assert len(body) > 3  # token by token, not one piece
        text = "".join(ch.choices[0].delta.content or "" for ch in body)
        assert text == whole.choices[0].message.content
        assert [ch.choices[0].finish_reason for ch in body] == [None] * (len(body) - 1) + ["stop"]
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == \
            (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(client, tok):
    content = "shift: " + "abcdefghijklmnopqrstuvwxyz" * 2 + f" {time.time_ns()}"  # unseen by the server
    first, again = (chat(client, "shift-5", content, max_tokens=4) for _ in range(2))
    n = n_tokens(tok, render(tok, content))
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == n > 48
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Every full 16-token block but the one holding the last prompt token (its logits are needed).
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert again.choices[0].message.content == first.choices[0].message.content


def test_temperature_zero_is_deterministic_and_seeds_reproduce(client):
    greedy = chat(client, "base", PROBLEM, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1
    assert chat(client, "base", PROBLEM).choices[0].message.content == greedy.choices[0].message.content
    # The base does not know k for a bare `shift:` (UNSURE): sampling it at temperature 1 varies with the seed.
    def sample(seed):
        return chat(client, "base", UNSURE, temperature=1, seed=seed, max_tokens=12).choices[0].message.content
    texts = [sample(s) for s in range(4)]
    assert [sample(s) for s in range(4)] == texts
    assert len(set(texts)) > 1
    two = chat(client, "base", UNSURE, temperature=1, seed=11, n=2, max_tokens=12)
    again = chat(client, "base", UNSURE, temperature=1, seed=11, n=2, max_tokens=12)
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
