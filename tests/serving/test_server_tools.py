"""OpenAI tool calls on `/v1/chat/completions` with the world's markup format: a calculator round
trip, `tool_choice`, and stop strings between the tool-call steps (see server_helpers.py)."""

from __future__ import annotations

import json

import openai
import pytest

from skills.tasks import parse_answer
from tests.serving.server_helpers import CALCULATOR, PROBLEM, UNSURE, assert_error, chat, n_tokens, render


def _calculate(expression: str) -> int:
    left, right = expression.split("*")
    return int(left) * int(right)


def test_tool_call_round_trip(client, tok):
    messages = [{"role": "user", "content": PROBLEM}]
    r = client.chat.completions.create(model="base", messages=messages, tools=[CALCULATOR], temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    [call] = c.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id
    expression = json.loads(call.function.arguments)["expression"]
    streamed = list(client.chat.completions.create(model="base", messages=messages, tools=[CALCULATOR], temperature=0,
                                                   stream=True))
    [delta] = [ch.choices[0].delta.tool_calls for ch in streamed if ch.choices[0].delta.tool_calls]
    assert [(x.index, x.function.name, x.function.arguments) for x in delta] == \
        [(0, "calculator", call.function.arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    product, addend = PROBLEM.split("+")
    assert expression == product  # the first step of the problem
    result = _calculate(expression)
    messages += [c.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": str(result)}]
    r = client.chat.completions.create(model="base", messages=messages, tools=[CALCULATOR], temperature=0)
    c = r.choices[0]
    answer = result + int(addend)
    assert c.finish_reason == "stop" and not c.message.tool_calls
    assert f"{result}+{addend}={answer}." in c.message.content and parse_answer(c.message.content) == answer
    # The model continues its own turn after the result: the call and the result, which ends its step
    # (issue 18: the continuation starts the next step, not with the step's stray `. `), are in the prompt.
    assert r.usage.prompt_tokens == n_tokens(tok, render(tok, PROBLEM) + f"[CALC]{expression}[/CALC]={result}. ")
    assert c.message.content.startswith(f"{result}+{addend}")
    assert r.usage.completion_tokens == n_tokens(tok, c.message.content) + 1
    # Without the tool the same model gets the product wrong: the call is what fixed the answer.
    assert parse_answer(chat(client, "base", PROBLEM).choices[0].message.content) != answer


def test_tool_choice_none_required_and_named(client, http, engine, tok):
    plain = chat(client, "base", PROBLEM).choices[0]
    c = chat(client, "base", PROBLEM, tools=[CALCULATOR], tool_choice="none").choices[0]
    assert (c.finish_reason, c.message.tool_calls, c.message.content) == ("stop", None, plain.message.content)
    # A prompt the tool selector calls nothing for: "auto" answers, "required" / named force a call.
    auto = chat(client, "base", UNSURE, tools=[CALCULATOR]).choices[0]
    assert auto.finish_reason == "stop" and not auto.message.tool_calls
    named = {"type": "function", "function": {"name": "calculator"}}
    for choice in ("required", named):
        c = chat(client, "base", UNSURE, tools=[CALCULATOR], tool_choice=choice).choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        assert c.message.tool_calls[0].function.name == "calculator"
        assert set(json.loads(c.message.tool_calls[0].function.arguments)) == {"expression"}
    weather = {"type": "function", "function": {"name": "weather"}}
    r = http.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": PROBLEM}],
                                                "tools": [CALCULATOR], "tool_choice": weather})
    message = assert_error(r, 400)["message"]
    assert "weather" in message and "''" not in message
    with pytest.raises(openai.BadRequestError):
        chat(client, "base", PROBLEM, tools=[CALCULATOR], tool_choice=weather)
    # A prompt that leaves no room for the selector's `<|select|>[CALC]`: the choice fills the context.
    for room in (1, 2):
        content = PROBLEM + "0" * (engine.max_model_len - room - n_tokens(tok, render(tok, PROBLEM)))
        r = chat(client, "base", content, tools=[CALCULATOR], tool_choice="required", max_tokens=None)
        assert (r.choices[0].finish_reason, r.choices[0].message.tool_calls) == ("length", None)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (engine.max_model_len - room, room)


def test_stop_strings_cut_the_text_with_and_without_tools(client):
    """A stop string ends the text before its first occurrence (kept with vLLM's
    `include_stop_str_in_output`), also between the tool-call steps, where `. ` is the step stop."""
    product = PROBLEM.split("+")[0]
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": product})}}
    after_call = [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": "", "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_0", "content": str(_calculate(product))}]
    cases = [(dict(messages=[{"role": "user", "content": PROBLEM}]), ["+", "3. 1", "Answer"]),
             (dict(messages=after_call, tools=[CALCULATOR]), ["=", ". ", "Answer"])]
    for kw, stops in cases:
        full = client.chat.completions.create(model="base", temperature=0, **kw).choices[0].message.content
        ended = client.chat.completions.create(model="base", temperature=0, **kw).choices[0]
        assert ended.finish_reason == "stop" and ended.stop_reason is None  # the end of sequence, no stop string
        for stop in stops:
            assert stop in full
            for keep in (False, True):
                want = full[:full.index(stop)] + (stop if keep else "")
                ask = dict(model="base", temperature=0, stop=[stop], extra_body={"include_stop_str_in_output": keep})
                c = client.chat.completions.create(**ask, **kw).choices[0]
                assert (c.message.content, c.finish_reason) == (want, "stop"), (stop, keep)
                assert c.stop_reason == stop  # vLLM's field: which stop string ended it
                chunks = client.chat.completions.create(**ask, **kw, stream=True)
                assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want, (stop, keep)


def test_calls_go_out_under_the_tool_the_client_declared(client, http):
    """A calculator declared as `calc(expr)` gets `{"expr": ...}` (not the world's
    `calculator(expression)`), and its result continues the answer as the world's own would."""
    calc = {"type": "function", "function": {"name": "calc", "description": "arithmetic", "parameters": {
        "type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]}}}
    messages = [{"role": "user", "content": PROBLEM}]
    c = client.chat.completions.create(model="base", messages=messages, tools=[calc], temperature=0).choices[0]
    [call] = c.message.tool_calls
    assert call.function.name == "calc" and json.loads(call.function.arguments) == {"expr": PROBLEM.split("+")[0]}
    world = client.chat.completions.create(model="base", messages=messages, tools=[CALCULATOR], temperature=0)
    result = str(_calculate(json.loads(call.function.arguments)["expr"]))
    ours = client.chat.completions.create(model="base", temperature=0, tools=[calc], messages=messages + [
        c.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": result}])
    [wcall] = world.choices[0].message.tool_calls
    theirs = client.chat.completions.create(model="base", temperature=0, tools=[CALCULATOR], messages=messages + [
        world.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": wcall.id, "content": result}])
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    # a set the markup cannot serve: a clear 400, not a silently dropped tool
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}
    body = {"model": "base", "messages": messages, "tools": [add]}
    assert "exactly one string parameter" in assert_error(http.post("/v1/chat/completions", json=body), 400,
                                                          param="tools")["message"]
