"""`GET /v1/models` and the `model` field: the base and every adapter are listed, and `NAME` /
`base:NAME` pick the adapter (see server_helpers.py for the references)."""

from __future__ import annotations

import openai
import pytest

from tests.serving.server_helpers import TASK, chat, reference, render


def test_models_lists_the_base_and_every_adapter(client, engine):
    models = client.models.list().data
    assert models[0].id == "base" and models[0].parent is None and models[0].max_model_len == engine.max_model_len
    adapters = models[1:]
    assert sorted(m.id for m in adapters) == sorted(engine.adapters)
    assert len(adapters) == len(engine.adapters) > 300
    assert all(m.parent == "base" and m.object == "model" for m in adapters)
    assert {"verifier", "self_eval", "tool_selector", "shift-1", TASK[0]} <= {m.id for m in adapters}


def test_model_name_picks_the_adapter(client, engine, tok):
    adapter, content = TASK
    base = chat(client, "base", content).choices[0].message.content
    named = chat(client, adapter, content).choices[0].message.content
    assert named != base  # the task adapter knows k = 3; the base cannot
    assert chat(client, "base:" + adapter, content).choices[0].message.content == named
    assert named == reference(engine, render(tok, content), adapter, 48).text
    assert base == reference(engine, render(tok, content), None, 48).text
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "base:no-such-adapter", content)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
