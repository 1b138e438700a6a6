"""The tool protocol and the generic core: markup and JSON call formats against hand-written
references, a user's own tools on a plain `Executor` (no world), the default world's wiring in
`orchestrator.world`, and a core that imports nothing of the world."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from orchestrator import Call, Executor, Generate, Graph, GraphError, JsonTool, MarkupTool, Score, State, Tool, \
    ToolCall, ToolResult, ToolSpec
from orchestrator.tools import calculator
from orchestrator.world import CALCULATOR, EVIDENCE, TOOLS, world_executor

from .fake_backend import FakeBackend

CORE = ("graph.py", "executor.py", "backend.py", "tools.py", "trace.py")
"""the generic orchestrator: no module of it may import the world"""


class Calls(State):
    call: str = ""


def _tool_graph(tool: str) -> Graph:
    g = Graph(Calls, "tool")
    g.add("propose", Call(lambda s: {"call": s.prompt}))
    g.add("tool", Tool(tool, call="call"))
    g.add("go", Generate(max_tokens=3))
    g.chain("propose", "tool", "go")
    return g


def test_markup_tool_finds_the_first_call_and_inserts_its_result():
    t = MarkupTool("calc", calculator, "<<", ">>", result_prefix=" -> ")
    assert isinstance(t, ToolSpec)
    text = "so << 6 * 7 >> and <<1+1>>"
    call = t.find(text)
    assert call == ToolCall("calc", "6 * 7", "<< 6 * 7 >>")
    res = t.run(call)
    assert res.ok and res.output == str(6 * 7) and res.input == "6 * 7"
    assert t.insertion(call, res) == "<< 6 * 7 >> -> 42"
    bad = t.run(t.find("<<1/0>>"))
    assert not bad.ok and t.insertion(t.find("<<1/0>>"), bad) == f"<<1/0>> -> [error: {bad.output}]"
    assert t.find("no call here") is None and t.find("<<unclosed") is None


def test_the_world_calculator_is_the_markup_tool_the_old_node_was():
    """`[CALC]expr[/CALC]` then the calculator's own insertion (`=1813`, `=[error: ...]`)."""
    assert TOOLS == (CALCULATOR,) and set(EVIDENCE) == {"calculator"}
    for expr in ("37*49", " 12 / 8 ", "9**9**9**9", "__import__('os')"):
        written = f"[CALC]{expr}[/CALC]"
        call = CALCULATOR.find("x " + written + " y [CALC]1+1[/CALC]")
        want = calculator(expr.strip())
        got = CALCULATOR.run(call)
        assert call.written == written and (got.ok, got.output, got.input) == (want.ok, want.output, want.input)
        assert CALCULATOR.insertion(call, got) == written + want.insertion


def test_json_tool_reads_hermes_calls_and_reports_bad_arguments():
    def weather(city: str, unit: str = "C") -> str:
        if not city:
            raise ValueError("city is empty")
        return f"{city}: 21 {unit}"

    t = JsonTool("weather", weather)
    body = {"name": "weather", "arguments": {"city": "Oslo", "unit": "F"}}
    text = '<tool_call>{"name": "other", "arguments": {}}</tool_call> <tool_call>not json</tool_call> ' \
        f"<tool_call>{json.dumps(body)}</tool_call>"
    call = t.find(text)
    assert call.arguments == body["arguments"] and call.written == f"<tool_call>{json.dumps(body)}</tool_call>"
    res = t.run(call)
    assert res.ok and res.output == weather("Oslo", "F") and json.loads(res.input) == body["arguments"]
    assert t.insertion(call, res) == call.written + f"<tool_response>{weather('Oslo', 'F')}</tool_response>"
    # OpenAI sends the arguments as JSON text
    as_text = t.find('<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>')
    assert t.run(as_text).output == weather("Rome")
    for args, match in (({"city": ""}, "city is empty"), ({"town": "Oslo"}, "unexpected keyword"),
                        ("[1, 2]", "must be a JSON object")):
        r = t.run(ToolCall("weather", args, "<tool_call>...</tool_call>"))
        assert not r.ok and match in r.output
        assert t.insertion(ToolCall("weather", args, "W"), r) == f"W<tool_response>error: {r.output}</tool_response>"
    assert t.find('<tool_call>{"name": "other"}</tool_call>') is None


def test_your_own_tools_run_on_a_plain_executor():
    """No world: a user's JSON tool and markup tool, found in state, run, inserted, and traced."""
    add = JsonTool("add", lambda a, b: a + b)
    upper = MarkupTool("upper", lambda x: ToolResult("upper", x, True, x.upper(), 0.0), "{", "}", ":")
    backend = FakeBackend()
    ex = Executor(backend, tools=[add, upper])
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    run = ex.run(_tool_graph("add"), call)
    assert run.text.startswith(call + "<tool_response>5</tool_response>") and run.state.call == ""
    (ev,) = run.trace.of("tool")
    assert ev["tool"] == "add" and ev["ok"] and ev["output"] == "5"
    run = ex.run(_tool_graph("upper"), "{abc}")
    assert run.text.startswith("{abc}:ABC") and run.trace.of("tool")[0]["output"] == "ABC"
    assert ex.run(_tool_graph("upper"), "no call").text == "ab."  # nothing to run: the model goes on
    with pytest.raises(GraphError, match=r"no tool 'calculator'; this executor knows \['add', 'upper'\]"):
        ex.run(_tool_graph("calculator"), "[CALC]1+1[/CALC]")
    assert backend.seqs == {}


def test_tools_and_evidence_are_checked():
    with pytest.raises(TypeError, match="name the executor's tool"):
        Tool()
    with pytest.raises(TypeError, match="must be a tools.ToolSpec"):
        Executor(FakeBackend(), tools={"calculator": calculator})  # a bare function is not a tool
    with pytest.raises(TypeError, match="must map a kind to a function"):
        Executor(FakeBackend(), evidence={"calculator": "yes"})
    with pytest.raises(ValueError, match="MarkupTool.open must be a non-empty string"):
        MarkupTool("t", str, "", "]")


def test_a_skill_whose_evidence_has_no_function_fails_clearly():
    """The world's verifier reads the calculator's verdicts: a plain executor has no function for
    them and says so; the world's executor has it."""
    from skills.world import World

    skills = {s.name: s for s in World.load().skills()}
    g = Graph(State, "judge")
    g.add("judge", Score("verifier"))
    with pytest.raises(GraphError, match=r"skill 'verifier' reads 'calculator' evidence.*evidence=\{'calculator'"):
        Executor(FakeBackend(), skills).run(g, "1+1")
    ex = world_executor(backend=FakeBackend())
    assert 0.0 <= ex.run(g, "1+1").state.score <= 1.0
    # a node's own evidence function is read instead of the skill's kind
    g = Graph(State, "own")
    g.add("judge", Score("verifier", evidence=lambda s: "v"))
    assert 0.0 <= Executor(FakeBackend(), skills).run(g, "1+1").state.score <= 1.0


def test_a_failed_run_leaves_nothing_on_the_executor():
    backend = FakeBackend()
    ex = Executor(backend, max_steps=5)
    before = dict(vars(ex))
    g = Graph(State, "endless")
    g.add("a", Generate(max_tokens=1))
    g.edge("a", "a")
    with pytest.raises(GraphError, match="step limit 5"):
        ex.run(g, "x")
    assert vars(ex).keys() == before.keys() and all(vars(ex)[k] is v for k, v in before.items())
    ok = Graph(State, "ok")
    ok.add("a", Generate(max_tokens=4))
    assert ex.run(ok, "x").text == "ab. " and backend.seqs == {}


def test_the_generic_core_imports_nothing_of_the_world():
    """graph, executor, backend, tools and trace read no world module (skills.spec is the skill
    *spec*, not a world); the world's wiring imports the core, never the reverse."""
    root = Path(__file__).parents[2] / "orchestrator"
    for name in CORE:
        tree = ast.parse((root / name).read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        world = sorted(m for m in found if m.startswith("skills") and m != "skills.spec"
                       or m.split(".")[0] in ("world", "chat", "strategies", "demo"))
        assert world == [], f"{name} imports {world}"
        if name != "tools.py":  # which holds the safe calculator, one tool among any
            assert "calc" not in (root / name).read_text().lower(), name


def test_the_http_backend_imports_without_torch():
    """A client of a remote server needs no torch: the HTTP backend and the graph core load
    without it (`serving.tokens`, the count type they share with the engine, is torch-free)."""
    import subprocess
    import sys

    code = ("import sys; import orchestrator.http_backend, orchestrator.graph, orchestrator.executor; "
            "print(sorted(m for m in ('torch', 'serving.engine', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
