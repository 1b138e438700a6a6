"""Tool-call formats: how conversations with tool calls are rendered for the model and how calls
are read back (the server's end-to-end round trip is in test_server_tools.py)."""

from __future__ import annotations

import json

import pytest

from serving.openai.protocol import APIError, ChatRequest, Message
from serving.openai.tool_formats import HermesTools, MarkupTools, dispatch_tool_format

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
    # what a proposer's unforced call must be to count: an argument, with no markup in it
    assert fmt.well_formed(fmt.parse("[CALC]58*6"))
    for junk in ("[CALC][CALC][CALC]", "[CALC][CALC]55", "[CALC]", "[CALC] [/CALC]"):
        assert not fmt.well_formed(fmt.parse(junk)), junk
    proposer = MarkupTools(proposer="tool_selector", invocation="<|select|>")
    assert not proposer.well_formed(proposer.parse("[CALC]6*7<|select|>")) and proposer.well_formed(proposer.parse("[CALC]6*7"))
    req = ChatRequest(model="base", messages=[{"role": "user", "content": "x"}], tools=CALC)
    for choice in ("auto", "required", "function:calculator"):
        bound = fmt.bind(req.tools, choice)
        assert (bound.function, bound.argument, bound.open) == ("calculator", "expression", "[CALC]")
    assert fmt.bind(req.tools, "none") is None and fmt.bind(None, "auto") is None


def _tools(*specs) -> list:
    """Declared tools from (name, parameters) pairs."""
    return ChatRequest(model="base", messages=[{"role": "user", "content": "x"}],
                       tools=[{"type": "function", "function": {"name": n, "parameters": p}} for n, p in specs]).tools


def _one(name: str, kind: str = "string") -> dict:
    return {"type": "object", "properties": {name: {"type": kind}}, "required": [name]}


def test_markup_calls_go_out_under_the_declared_tool():
    """The markup's one string argument maps onto the tool the client declared, its name and its
    parameter whatever they are called; a set the markup cannot serve is a 400 that says why."""
    fmt = MarkupTools()
    calc = fmt.bind(_tools(("calc", _one("expr"))), "auto")
    assert (calc.function, calc.argument) == ("calc", "expr")
    call = calc.parse("[CALC]37*49")
    assert call.name == "calc" and json.loads(call.arguments) == {"expr": "37*49"}
    msgs, _ = calc.render(_msgs({"role": "user", "content": "37*49"},
                                {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
                                    "name": "calc", "arguments": json.dumps({"expr": "37*49"})}}]},
                                {"role": "tool", "tool_call_id": "a", "content": "1813"}))
    assert msgs[-1]["content"] == "[CALC]37*49[/CALC]=1813"
    # the one named like the format's function wins over others that fit; tool_choice picks any that fits
    both = _tools(("calc", _one("expr")), ("calculator", _one("expression")), ("weather", _one("city")))
    assert fmt.bind(both, "auto").function == "calculator" and fmt.bind(both, "function:weather").argument == "city"
    refused = [(_tools(("search", None)), "auto", "none of the declared tools"),
               (_tools(("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})),
                "required", "exactly one string parameter"),
               (_tools(("count", _one("n", "integer"))), "auto", "exactly one string parameter"),
               (_tools(("calc", _one("expr")), ("weather", _one("city"))), "auto", "name one with tool_choice"),
               (both + _tools(("search", None)), "function:search", "'search' does not take exactly one string"),
               (both, "function:missing", "not among the declared tools")]
    for tools, choice, why in refused:
        with pytest.raises(APIError, match=why) as err:
            fmt.bind(tools, choice)
        assert err.value.status == 400 and err.value.param in ("tools", "tool_choice")


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



def test_hermes_calls_are_validated_against_the_declared_schemas():
    fmt = HermesTools().bind(_tools(("calculator", _one("expression")), ("weather", {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"], "additionalProperties": False})), "auto")
    block = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'.format
    good = [block("calculator", '{"expression": "2+2"}'), block("weather", '{"city": "Oslo", "days": 2}')]
    bad = [block("weather", '{"days": 2}'), block("weather", '{"city": "Oslo", "days": 0}'),
           block("weather", '{"city": "Oslo", "wind": 1}'), block("search", '{"q": "x"}'),
           block("calculator", '{"expression": 4}')]
    content, calls = fmt.split("ok " + "".join(good + bad))
    assert content == "ok" and [c.name for c in calls] == ["calculator", "weather"]
    assert fmt.split("".join(bad)) == ("".join(bad), [])  # nothing valid: the text stays text
    with pytest.raises(APIError, match="not a valid JSON schema") as err:
        HermesTools().bind(_tools(("f", {"type": "object", "properties": {"a": {"type": "nonsense"}}})), "auto")
    assert err.value.param == "tools"


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
        fmt.bind(None, "required")


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
