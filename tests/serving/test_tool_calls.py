"""Tool-call formats: how conversations with tool calls are rendered for the model and how calls
are read back (the server's end-to-end round trip is in test_server.py)."""

from __future__ import annotations

import json

import pytest

from serving.openai_protocol import APIError, ChatRequest, Message
from serving.tool_calls import HermesTools, MarkupTools, dispatch_tool_format

CALC = [{"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}]


def _msgs(*raw) -> list[Message]:
    return ChatRequest(model="base", messages=list(raw)).messages


def _call(i: str, expr: str, name: str = "calculator") -> dict:
    return {"id": i, "type": "function", "function": {"name": name, "arguments": json.dumps({"expression": expr})}}


def test_markup_folds_calls_and_results_into_the_assistant_turn_it_continues():
    fmt = MarkupTools()
    msgs = _msgs({"role": "user", "content": "37*49+12"},
                 {"role": "assistant", "content": None, "tool_calls": [_call("a", "37*49")]},
                 {"role": "tool", "tool_call_id": "a", "content": "1813"},
                 {"role": "assistant", "content": ". 1813+12=", "tool_calls": [_call("b", "1813+12")]},
                 {"role": "tool", "tool_call_id": "b", "content": "1825"})
    out, continues = fmt.render(msgs)
    assert continues
    assert out == [{"role": "user", "content": "37*49+12"},
                   {"role": "assistant", "content": "[CALC]37*49[/CALC]=1813. 1813+12=[CALC]1813+12[/CALC]=1825"}]


def test_markup_closes_a_finished_turn_and_the_world_template_continues_an_open_one():
    from skills.world import World

    fmt = MarkupTools()
    done, cont = fmt.render(_msgs({"role": "user", "content": "2*3"},
                                  {"role": "assistant", "content": "", "tool_calls": [_call("a", "2*3")]},
                                  {"role": "tool", "tool_call_id": "a", "content": "6"},
                                  {"role": "assistant", "content": ". Answer: 6"},
                                  {"role": "user", "content": "and 4*5?"}))
    assert not cont and [m["role"] for m in done] == ["user", "assistant", "user"]
    assert done[1]["content"] == "[CALC]2*3[/CALC]=6. Answer: 6"
    tok = World.load().tokenizer()
    open_turn, cont = fmt.render(_msgs({"role": "user", "content": "2*3"},
                                       {"role": "assistant", "content": "", "tool_calls": [_call("a", "2*3")]},
                                       {"role": "tool", "tool_call_id": "a", "content": "6"}))
    text = tok.apply_chat_template(open_turn, tokenize=False, add_generation_prompt=False, continue_final_message=cont)
    assert text == "<bos><|user|>2*3<|end|><|assistant|>[CALC]2*3[/CALC]=6"


@pytest.mark.parametrize("raw,match", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "zz", "content": "1"}], "answers no tool call"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [_call("a", "1+1")]}],
     "have no tool message"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [_call("a", "1+1", "search")]},
      {"role": "tool", "tool_call_id": "a", "content": "1"}], "calls only 'calculator', not 'search'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": "{not json"}}]},
      {"role": "tool", "tool_call_id": "a", "content": "1"}], "not JSON"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": '{"expr": "1"}'}}]},
      {"role": "tool", "tool_call_id": "a", "content": "1"}], "takes {'expression': string}"),
])
def test_markup_refuses_inconsistent_conversations(raw, match):
    with pytest.raises(APIError, match=match) as err:
        MarkupTools().render(_msgs(*raw))
    assert err.value.status == 400 and err.value.param.startswith("messages")


def test_markup_parses_a_call_and_checks_what_a_request_may_ask():
    fmt = MarkupTools()
    call = fmt.parse("[CALC] 37*49 ")
    assert call.name == "calculator" and json.loads(call.arguments) == {"expression": "37*49"}
    assert call.id.startswith("call_") and fmt.parse("[CALC]6*7[/CALC]").arguments == '{"expression": "6*7"}'
    assert fmt.parse("no call here") is None
    req = ChatRequest(model="base", messages=[{"role": "user", "content": "x"}], tools=CALC)
    assert fmt.check(req.tools, "auto") and fmt.check(req.tools, "required")
    assert fmt.check(req.tools, "function:calculator")
    assert not fmt.check(req.tools, "none") and not fmt.check(None, "auto")
    other = ChatRequest(model="base", messages=[{"role": "user", "content": "x"}],
                        tools=[{"type": "function", "function": {"name": "search"}}]).tools
    assert not fmt.check(other, "auto")  # a model that chooses not to call tools it cannot use
    with pytest.raises(APIError, match="can only call the function 'calculator'"):
        fmt.check(other, "required")
    with pytest.raises(APIError, match="not 'search'"):
        fmt.check(req.tools + other, "function:search")


QWEN_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_hermes_reads_tool_call_blocks_and_leaves_plain_text_alone():
    fmt = HermesTools()
    text = ('Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
            '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call><tool_call>{broken</tool_call>')
    content, calls = fmt.split(text)
    assert content == "Let me compute."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("calculator", {"expression": "2+2"}),
                                                                   ("search", {"q": "x"})]
    assert fmt.split("just text") == ("just text", [])
    assert fmt.split("<tool_call>{\"name\": \"f\", \"arguments\": {}}")[1][0].name == "f"  # cut off at max_tokens


def test_hermes_renders_calls_and_tools_through_the_model_template(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import save_char_tokenizer

    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = QWEN_LIKE
    fmt = dispatch_tool_format("auto", tok)
    assert isinstance(fmt, HermesTools)
    msgs, cont = fmt.render(_msgs({"role": "developer", "content": "be brief"}, {"role": "user", "content": "2+2"},
                                  {"role": "assistant", "tool_calls": [_call("a", "2+2")]},
                                  {"role": "tool", "tool_call_id": "a", "content": "4"}))
    assert not cont and msgs[0]["role"] == "system"
    text = tok.apply_chat_template(msgs, tools=CALC, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>' in text
    assert text.startswith('<tools>{"type": "function"') and text.endswith("<|tool|>4<|end|><|assistant|>")
    with pytest.raises(APIError, match="not supported with the hermes format"):
        fmt.check(None, "required")


def test_dispatch_picks_a_format_or_says_what_exists(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import save_char_tokenizer

    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    proposer = MarkupTools(proposer="tool_selector", invocation="<|select|>")
    assert dispatch_tool_format("auto", tok, proposer) is proposer
    assert dispatch_tool_format("auto", tok) is None  # no template that renders tools
    assert dispatch_tool_format("none", tok, proposer) is None
    assert isinstance(dispatch_tool_format("markup", tok), MarkupTools)
    assert isinstance(dispatch_tool_format("hermes", tok), HermesTools)
    with pytest.raises(ValueError, match="supported: auto, markup, hermes, none"):
        dispatch_tool_format("pythonic", tok)
