"""`kilolora serve MODEL_DIR --adapter NAME=DIR` on a user's own model: a tiny random HF Llama with a
real PEFT adapter, served by a real subprocess; outputs equal the in-process engine's."""

from __future__ import annotations

import openai
import pytest

from serving import Engine, SamplingParams
from tests.helpers import kilolora_server, make_peft_adapter, make_tiny_model


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_model")
    make_tiny_model(root / "base", seed=3)
    make_peft_adapter(root / "base", root / "math", seed=4)
    return root


@pytest.fixture(scope="module")
def url(user_model, tmp_path_factory):
    args = [user_model / "base", "--adapter", f"math={user_model / 'math'}"]
    with kilolora_server(args, tmp_path_factory.mktemp("hf_server") / "serve.log") as base:
        yield base


def test_a_user_model_and_its_peft_adapter_serve_as_in_process(user_model, url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"base", "math"} and ids["math"].parent == "base"
    assert ids["math"].root == str(user_model / "math")
    engine = Engine.from_pretrained(user_model / "base", adapters={"math": user_model / "math"})
    prompt = "abc 12+3="
    got = {}
    for model in ("base", "math", "base:math"):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        got[model] = r.choices[0].text
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 12  # random weights: no end
    want = {a: engine.generate(prompt, a, SamplingParams(max_tokens=12, temperature=0))[0].text for a in (None, "math")}
    assert want["math"] != want[None]  # the adapter changes the output
    assert got["base"] == want[None] and got["math"] == got["base:math"] == want["math"]


def test_without_a_chat_template_or_tool_format_chat_and_tools_are_clear_400s(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="chat template cannot render"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    tools = [{"type": "function", "function": {"name": "calculator"}}]
    with pytest.raises(openai.BadRequestError, match="no tool-call format"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], tools=tools)
