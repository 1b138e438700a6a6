"""`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`: a PEFT directory is served by name,
refused while in use, and bad paths are refused (see server_helpers.py)."""

from __future__ import annotations

import openai
import pytest

from tests.serving.server_helpers import TASK, WORLD, assert_error, chat, reference, render, sse


def test_load_serve_and_unload_a_peft_adapter(client, http, engine, tok, tmp_path):
    import torch

    from compression import Bank, save_adapter

    adapter_dir = Bank.load(WORLD.bank_dir).export(TASK[0], tmp_path / "exported")  # a plain PEFT directory
    name = "my-shift"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter_dir)})
    assert r.status_code == 200, r.text
    [m] = [m for m in client.models.list().data if m.id == name]
    assert m.parent == "base" and m.root == str(adapter_dir)
    engine.load_adapter(name, adapter_dir)
    try:
        want = reference(engine, render(tok, TASK[1]), name, 48).text
    finally:
        engine.unload_adapter(name)
    assert want != reference(engine, render(tok, TASK[1]), None, 48).text
    assert chat(client, name, TASK[1]).choices[0].message.content == want
    assert chat(client, "base:" + name, TASK[1]).choices[0].message.content == want
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter_dir)}), 400,
                 param="lora_name")  # already loaded
    body = {"model": name, "messages": [{"role": "user", "content": TASK[1]}], "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as running:
        lines = running.iter_lines()
        next(lines)
        assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": name}), 409, "adapter_in_use")
        assert sse(lines)[-1] == "[DONE]"

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == 200, r.text
    assert name not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(client, name, TASK[1])
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": name}), 404, "model_not_found")
    err = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "bank", "lora_path": str(WORLD.bank_dir)}),
                       400, param="lora_path")
    assert "--bank" in err["message"]  # a bank is served from the start
    for path in ["https://huggingface.co/some/adapter", "some/adapter", str(tmp_path / "missing")]:
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "remote", "lora_path": path}), 400,
                     param="lora_path")
    # Local directories that are not adapters of this base: an empty one, one made for a 32-wide model.
    target = "base_model.model.model.layers.0.self_attn.q_proj"
    other = save_adapter(tmp_path / "other", {target: torch.randn(4, 32)}, {target: torch.randn(32, 4)},
                         {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"})
    (tmp_path / "empty").mkdir()
    for path in [tmp_path / "empty", other]:
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "wrong", "lora_path": str(path)}), 400,
                     param="lora_path")
    assert not {"remote", "wrong"} & {m.id for m in client.models.list().data}


def test_load_inplace_replaces_the_weights_under_the_same_name(client, http, engine, tok, tmp_path):
    """vLLM's `load_inplace`: the second load of a name serves the new directory's weights (as
    the engine computes them alone); without it the second load is refused."""
    from compression import Bank

    bank = Bank.load(WORLD.bank_dir)
    first, second = bank.export(TASK[0], tmp_path / "first"), bank.export(bank.names[-1], tmp_path / "second")
    name = "swapped"
    assert http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(first)}).status_code == 200
    try:
        before = chat(client, name, TASK[1]).choices[0].message.content
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(second)}), 400,
                     param="lora_name")
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(second), "load_inplace": True})
        assert r.status_code == 200, r.text
        engine.load_adapter(name, second)
        try:
            want = reference(engine, render(tok, TASK[1]), name, 48).text
        finally:
            engine.unload_adapter(name)
        assert chat(client, name, TASK[1]).choices[0].message.content == want != before
    finally:
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})
