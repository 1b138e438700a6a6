"""The clients people already use, unchanged, against `kilolora serve` (the suite-wide subprocess on
the embedded world; see server_helpers.py): the `openai` SDK's own round trip of an assistant
message, every field of OpenAI's spec (neutral values change nothing; values the server cannot
honour are 400s naming the field), unknown fields accepted and named in a header (as vLLM logs
them), `GET /v1/models/{id}`, `/version`, `/ping`, and Prometheus `/metrics` under vLLM's names.

References: greedy text from the in-process engine of the same world, the spec from the `openai`
package's request types, the metric counts from the requests the test makes."""

from __future__ import annotations

import importlib.metadata
import inspect

import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import ChatCompletionAssistantMessageParam, ChatCompletionContentPartTextParam, \
    ChatCompletionSystemMessageParam, ChatCompletionToolMessageParam, ChatCompletionUserMessageParam
from openai.types.chat import completion_create_params as chat_params
from prometheus_client.parser import text_string_to_metric_families

from serving.openai.boundary import IGNORED_HEADER, Gate
from serving.openai.protocol import ChatRequest, CompletionRequest, ContentPart, Message
from tests.serving.server_helpers import PROBLEM, TASK, WORLD, assert_error, chat, n_tokens, reference, render, sse

HEADER = IGNORED_HEADER


def greedy_chat(engine, tok, messages: list[dict], max_tokens: int = 48) -> str:
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return reference(engine, prompt, None, max_tokens).text


# ------------------------------------------------------------------------- the spec, field by field
def _keys(*typed_dicts) -> set[str]:
    return {k for t in typed_dicts for c in t.__mro__ for k in getattr(c, "__annotations__", {})}


def test_every_field_the_sdk_can_send_is_a_field_of_the_schema():
    """The `openai` package's request types are the spec the SDK sends: every key is known (not
    merely dropped as unknown), in the request and in each kind of message and content part."""
    assert _keys(chat_params.CompletionCreateParamsBase) - {"stream"} <= set(ChatRequest.model_fields)
    assert _keys(completion_params.CompletionCreateParamsBase) <= set(CompletionRequest.model_fields)
    assert _keys(ChatCompletionAssistantMessageParam, ChatCompletionUserMessageParam, ChatCompletionToolMessageParam,
                 ChatCompletionSystemMessageParam) <= set(Message.model_fields)
    assert _keys(ChatCompletionContentPartTextParam) <= set(ContentPart.model_fields)
    sdk = set(inspect.signature(openai.OpenAI(api_key="x").chat.completions.create).parameters)
    assert sdk - {"extra_headers", "extra_query", "extra_body", "timeout"} <= set(ChatRequest.model_fields)


def test_the_sdks_own_assistant_message_round_trips(client, engine, tok):
    """`message.model_dump()` carries refusal, annotations, audio and function_call (all null):
    sent back as history, it is a turn like any other."""
    first = chat(client, "base", PROBLEM).choices[0].message
    dumped = first.model_dump()
    assert {"refusal", "annotations", "audio", "function_call", "tool_calls"} <= set(dumped)  # what used to be 400
    assert dumped["refusal"] is None and dumped["audio"] is None and dumped["content"]
    history = [{"role": "user", "content": PROBLEM}, dumped, {"role": "user", "content": "21*34+5"}]
    raw = client.chat.completions.with_raw_response.create(model="base", messages=history, temperature=0,
                                                           max_tokens=48)
    assert HEADER not in raw.headers  # spec fields: known, not ignored
    want = greedy_chat(engine, tok, [{"role": "user", "content": PROBLEM},
                                     {"role": "assistant", "content": first.content},
                                     {"role": "user", "content": "21*34+5"}])
    assert raw.parse().choices[0].message.content == want


NEUTRAL_CHAT = dict(store=False, metadata={"team": "evals"}, service_tier="auto", parallel_tool_calls=True, user="u-17",
                    prompt_cache_key="k1", prompt_cache_retention="in_memory", safety_identifier="s-1",
                    reasoning_effort="low", prediction={"type": "content", "content": "Answer: 1825"},
                    modalities=["text"], verbosity="medium", audio=None, web_search_options=None, moderation=None,
                    functions=None, function_call="none", response_format={"type": "text"}, top_logprobs=None,
                    logprobs=False, frequency_penalty=0, presence_penalty=0, logit_bias={}, n=1, seed=None,
                    max_completion_tokens=48)


def test_every_neutral_field_changes_nothing(client, engine, tok):
    want = greedy_chat(engine, tok, [{"role": "user", "content": PROBLEM}])
    assert chat(client, "base", PROBLEM).choices[0].message.content == want
    raw = client.chat.completions.with_raw_response.create(
        model="base", messages=[{"role": "user", "content": PROBLEM}], temperature=0, **NEUTRAL_CHAT)
    assert HEADER not in raw.headers
    assert raw.parse().choices[0].message.content == want
    stream = chat(client, "base", PROBLEM, stream=True, stream_options={"include_usage": True,
                                                                        "include_obfuscation": False},
                  **{k: v for k, v in NEUTRAL_CHAT.items() if k != "max_completion_tokens"})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None
    prompt = render(tok, PROBLEM)
    neutral = dict(echo=False, suffix=None, best_of=1, user="u-17", logit_bias={}, frequency_penalty=0,
                   presence_penalty=0, n=1)
    r = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=48, **neutral)
    assert r.choices[0].text == want


def test_unknown_fields_are_accepted_and_named_in_a_header(http, client, engine, tok, tmp_path_factory):
    want = greedy_chat(engine, tok, [{"role": "user", "content": PROBLEM}])
    body = {"model": "base", "temperature": 0, "max_tokens": 48, "frobnicate": 1, "x_trace": {"span": 3},
            "messages": [{"role": "user", "content": PROBLEM, "x_lang": "en"}]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.headers[HEADER] == "frobnicate, x_trace, messages.0.x_lang"
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:  # streams too
        assert s.headers[HEADER] == "frobnicate, x_trace, messages.0.x_lang"
        events = sse(s.iter_lines())
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == want
    # through the SDK's extra_body (how people send vLLM's or other servers' extensions)
    raw = client.completions.with_raw_response.create(model="base", prompt=render(tok, PROBLEM), temperature=0,
                                                      max_tokens=48, extra_body={"spaces_between_special_tokens": 1})
    assert raw.headers[HEADER] == "spaces_between_special_tokens" and raw.parse().choices[0].text == want
    # a refused request names them too; a client's field name cannot break the header
    r = http.post("/v1/chat/completions", json={**body, "model": "nope", "bad\r\nname, x": 1})
    assert_error(r, 404, "model_not_found")
    assert r.headers[HEADER] == "frobnicate, x_trace, bad%0D%0Aname%2C%20x, messages.0.x_lang"
    # ... and the server logs them, as vLLM does
    [log] = tmp_path_factory.getbasetemp().glob("world_server[0-9]*/serve.log")
    assert "The following fields were present in the request but ignored: ['frobnicate', 'x_trace', " \
           "'messages.0.x_lang']" in log.read_text()


REFUSED = [  # (extra fields of a chat request, the param the 400 names)
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"n": 2, "prediction": {"type": "content", "content": "1825"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"verbosity": "high"}, "verbosity"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": PROBLEM},
                                                {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content.1.type"),
    ({"messages": [{"role": "user", "content": PROBLEM},
                   {"role": "assistant", "content": None, "audio": {"id": "audio_1"}}]}, "messages.1.audio"),
    ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools.0.type"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}}, "tool_choice.type"),
    ({"bad_words": ["x"]}, "bad_words"),  # vLLM's extensions that change the output are not silently dropped
    ({"use_beam_search": True}, "use_beam_search"),  # (its penalties, min_p, min_tokens: test_server_sampling)
    ({"guided_json": {"type": "object"}, "tools": [{"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}}}}]}, "guided_json"),  # no room for calls
]


@pytest.mark.parametrize("extra,param", REFUSED)
def test_what_the_server_cannot_honour_is_a_400_naming_it(http, extra, param):
    body = {"model": "base", "messages": [{"role": "user", "content": PROBLEM}], "max_tokens": 4, **extra}
    err = assert_error(http.post("/v1/chat/completions", json=body), 400, "unsupported_value", param)
    assert repr(param) in err["message"]


def test_the_sdk_sees_a_refusal_as_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "base", PROBLEM, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    assert e.value.code == "unsupported_value" and e.value.param == "audio"
    for kw, param in [(dict(suffix="x"), "suffix"), (dict(best_of=3), "best_of")]:  # echo: test_server_scoring
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="base", prompt="1+1", max_tokens=2, **kw)
        assert (e.value.code, e.value.param) == ("unsupported_value", param)


def test_validation_of_used_fields_is_as_strict_as_before(http):
    msg = [{"role": "user", "content": PROBLEM}]
    for extra, param in [({"temperature": 3}, "temperature"), ({"n": 17}, "n"), ({"top_logprobs": 21}, "top_logprobs"),
                         ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a"] * 5}, "stop"),
                         ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role")]:
        assert_error(http.post("/v1/chat/completions", json={"model": "base", "messages": msg, **extra}), 400,
                     "invalid_value", param)


# ----------------------------------------------------------------------------------- the endpoints
def test_models_retrieve(client, http, engine, tmp_path):
    from compression import Bank

    base = client.models.retrieve("base")
    assert (base.id, base.object, base.parent, base.max_model_len) == ("base", "model", None, engine.max_model_len)
    listed = {m.id: m.model_dump(exclude={"created"}) for m in client.models.list().data}
    for name in ["base", TASK[0], "verifier"]:
        assert client.models.retrieve(name).model_dump(exclude={"created"}) == listed[name]
    named = client.models.retrieve("base:" + TASK[0])  # the SDK leaves `:` as is
    assert (named.id, named.parent, named.root) == ("base:" + TASK[0], "base", listed[TASK[0]]["root"])
    for missing in ["nope", "base:nope", "team/nope"]:
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(missing)
        assert e.value.code == "model_not_found"
    # an adapter name with `/` (the SDK sends it as %2F)
    path = Bank.load(WORLD.bank_dir).export(TASK[0], tmp_path / "exported")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "team/shift", "lora_path": str(path)})
    assert r.status_code == 200, r.text
    try:
        m = client.models.retrieve("team/shift")
        assert (m.id, m.parent, m.root) == ("team/shift", "base", str(path))
        assert http.get("/v1/models/base:team/shift").json()["id"] == "base:team/shift"
    finally:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "team/shift"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("team/shift")


def test_version_and_ping(http):
    assert http.get("/version").json() == {"version": importlib.metadata.version("kilolora")}
    r = http.get("/ping")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_probes_need_no_key_and_the_model_card_does():
    """As vLLM: /health, /ping, /version and /metrics are open; every /v1 route needs the key."""
    gate = Gate(None, "k", lambda: None)

    def check(path: str, headers=()):
        return gate.check({"type": "http", "method": "GET", "path": path, "headers": list(headers)})

    assert all(check(p) is None for p in ["/health", "/ping", "/version", "/metrics"])
    assert check("/v1/models/base").status == 401
    assert check("/v1/models/base", [(b"authorization", b"Bearer k")]) is None


# ------------------------------------------------------------------------------------------ metrics
def scrape(http) -> tuple[dict, str]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}, r.text


def value(families: dict, family: str, sample: str, **labels) -> float:
    [v] = [s.value for s in families[family].samples if s.name == sample and all(
        s.labels.get(k) == v for k, v in labels.items())]
    return v


def test_metrics_count_the_requests_made(http, client, tok):
    before, _ = scrape(http)
    whole = chat(client, "base", PROBLEM)
    streamed = list(chat(client, "base", TASK[1], stream=True, stream_options={"include_usage": True}))
    after, text = scrape(http)
    usage = [whole.usage, streamed[-1].usage]
    assert usage[1].prompt_tokens == n_tokens(tok, render(tok, TASK[1]))

    def delta(family, sample, **labels):
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    e2e, ttft = "vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds"
    assert (after[e2e].type, after[ttft].type) == ("histogram", "histogram")
    assert f"# HELP {e2e} " in text and f"# TYPE {e2e} histogram" in text
    assert delta(e2e, e2e + "_count") == 2
    assert delta(e2e, e2e + "_bucket", le="+Inf") == 2 and delta(e2e, e2e + "_sum") > 0
    # both: the streamed one when its first chunk went out, the whole one when the engine made its first token
    assert delta(ttft, ttft + "_count") == 2
    assert 0 < delta(ttft, ttft + "_sum") < delta(e2e, e2e + "_sum")
    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == sum(u.completion_tokens for u in usage)
    assert after["vllm:prompt_tokens"].type == "counter"
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="stop") == 2
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_count") == 2
    for gauge in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]:
        assert after[gauge].type == "gauge" and after[gauge].samples[0].labels == {"model_name": "base"}
    assert value(after, "vllm:num_requests_running", "vllm:num_requests_running") == 0
    # what the server exposed before stays, under the same names
    for name in ["kilolora_kv_blocks_total", "kilolora_kv_blocks_used", "kilolora_open_sequences",
                 "kilolora_engine_steps", "kilolora_requests_running", "kilolora_requests_cancelled",
                 "kilolora_engine_step_seconds", "kilolora_adapters"]:
        assert name in after, name
    assert delta("kilolora_requests", "kilolora_requests_total") == 2


def test_each_app_has_its_own_registry(engine):
    import prometheus_client

    from serving.openai.api_server import create_app
    from serving.openai.metrics import ServerMetrics

    create_app(engine), create_app(engine)  # the same names twice in one process: no clash
    a, b = ServerMetrics(), ServerMetrics()
    a.finished(0.0, 10, 5, ["stop"])
    fa = {f.name: f for f in text_string_to_metric_families(a.render({}, 0.0).decode())}
    fb = {f.name: f for f in text_string_to_metric_families(b.render({}, 0.0).decode())}
    assert value(fa, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 10
    assert value(fb, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 0
    assert "vllm:e2e_request_latency_seconds" not in prometheus_client.generate_latest().decode()
