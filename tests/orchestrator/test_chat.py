"""`kilolora chat`: driven as a real subprocess in a pseudo-terminal (pexpect), in-process and
against `kilolora serve`, and the `ChatSession` under it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from orchestrator.chat import read_problem, read_transform
from orchestrator.executor import Executor
from orchestrator.world import world_chat
from skills.tasks import Transform, parse_answer

KILOLORA = str(Path(sys.executable).with_name("kilolora"))
PROMPT = r"you \[(\S+)\] ›"
E = r"(?:\x1b\[[0-9;?]*[A-Za-z])*"
"""terminal escapes (bold, dim) that may sit between words even with NO_COLOR"""


def _spawn(args: list[str], home: Path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(home), "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm",
           "NO_COLOR": "1",
           "COLUMNS": "120", "LINES": "40"}
    child = pexpect.spawn(KILOLORA, ["chat", *args], env=env, encoding="utf-8", timeout=120, dimensions=(40, 120))
    child.expect(PROMPT)
    return child


def test_chat_in_a_terminal_calls_the_tool_answers_right_shows_the_trace_and_exits(tmp_path):
    a, b, c = 37, 49, 12
    child = _spawn([], tmp_path)
    child.sendline(f"{a}*{b}+{c}")
    child.expect(r"tool_selector\s+proposes \[CALC\]37\*49\[/CALC\]")
    child.expect(rf"calculator\s+37\*49 = {E}{a * b}")
    child.expect(r"base\s+")  # the step after the insertion, written by the base
    child.expect(r"verifier\s+score (\d\.\d\d)")
    assert float(child.match.group(1)) >= 0.5
    child.expect(r"answer\s+(\d+)")
    assert int(child.match.group(1)) == a * b + c
    child.expect(PROMPT)
    child.sendline("/trace")
    child.expect("trace of the last turn")
    child.expect(r"adapter base -> tool_selector")
    child.expect(rf"calculator\(37\*49\) = {a * b}")
    child.expect(r"verifier score \d\.\d{3}")
    child.expect(PROMPT)
    child.sendline("/adapter no-such-adapter")
    child.expect("no adapter 'no-such-adapter' is served")
    child.expect(PROMPT)
    child.sendcontrol("d")
    child.expect("bye")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    assert f"{a}*{b}+{c}" in (tmp_path / ".kilolora" / "chat_history").read_text()


def test_history_recalls_with_the_up_arrow_and_ctrl_c_leaves_cleanly(tmp_path):
    child = _spawn(["--no-verify"], tmp_path)
    child.sendline("/adapter shift-2")
    child.expect("answering with shift-2")
    child.expect(r"you \[shift-2\] ›")
    child.send("\x1b[A")  # up: the last line comes back for editing
    child.expect("/adapter shift-2")
    child.sendcontrol("c")
    child.expect("bye")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_against_the_server_over_http_in_a_pipe(world_server):
    import subprocess

    out = subprocess.run([KILOLORA, "chat", "--url", world_server + "/v1"],
                         input="What is 58*6+31?\nreplace l x: hello\n/trace\n",
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "http://" in out.stdout and "calculator" in out.stdout
    assert "reading this as the arithmetic problem 58*6+31" in out.stdout
    assert f"answer        {58 * 6 + 31}" in out.stdout
    assert "replace l x: adapter replace-lx answers 'replace: hello'" in out.stdout
    assert f"answer        {Transform('replace', 'l x').apply('hello')}" in out.stdout
    assert "trace of the last turn" in out.stdout and out.stdout.rstrip().endswith("bye")


def test_chat_in_a_pipe_says_what_each_message_is_and_runs_only_the_skills_that_fit():
    import subprocess

    want = Transform("replace", "l x").apply("hello")
    out = subprocess.run([KILOLORA, "chat"], input="replace l x: hello\nhello there\n", capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    note = next(line for line in lines if "replace l x:" in line)  # one line, not wrapped at 80 columns
    assert "adapter replace-lx answers 'replace: hello'" in note
    assert note.endswith("not arithmetic: no calculator, no arithmetic verifier")
    assert f"  replace-lx    {want}" in lines and f"  answer        {want}" in lines
    assert any("not arithmetic or a transformation of this world: the base alone" in line for line in lines)
    assert "tool_selector" not in out.stdout and "score" not in out.stdout


def test_chat_with_no_server_is_one_clear_error():
    import subprocess

    out = subprocess.run([KILOLORA, "chat", "--url", "http://127.0.0.1:9/v1"], input="", capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("kilolora: error: cannot reach the server")
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def session():
    return world_chat()


def test_session_turns_keep_the_conversation_and_reset_forgets_it(session):
    session.reset()
    first = session.turn("12*3+4")
    assert session.history == [{"role": "user", "content": "12*3+4"}, {"role": "assistant", "content": first.text}]
    assert [e["to"] for e in first.trace.of("adapter")][:2] == ["tool_selector", "base"]
    assert first.trace.of("score")[-1]["skill"] == "verifier"
    session.turn("5*6+7")
    assert len(session.history) == 4
    session.reset()
    assert session.history == [] and session.last is None


def test_session_turns_setting_decides_what_the_model_sees(session):
    seen = []
    executor: Executor = session.executor
    old = executor.backend.chat_prompt
    executor.backend.chat_prompt = lambda m: seen.append(m) or old(m)
    try:
        session.reset()
        session.turns_seen = 0
        session.turn("1+2")
        session.turn("3+4")
        assert seen[-1] == "3+4"  # only the message
        session.turns_seen = None
        session.turn("5+6")
        assert [m["content"] for m in seen[-1]][:3] == ["1+2", session.history[1]["content"], "3+4"]
    finally:
        executor.backend.chat_prompt = old
        session.turns_seen = 0


def test_session_adapter_choice_is_checked_and_used(session):
    with pytest.raises(ValueError, match="no adapter 'nope' is served"):
        session.set_adapter("nope")
    session.set_adapter("shift-1")
    try:
        run = session.turn("abc")
        steps = [e for e in run.trace.of("node") if e["kind"] == "generate"]
        assert steps and all(e["adapter"] == "shift-1" for e in steps)
    finally:
        session.set_adapter("base")
    assert session.adapter is None


@pytest.mark.parametrize("message", ["58*63-17", "What is 58*63-17?", "compute 58*63-17 please", "58 * 63 - 17 = ?",
                                     "what is 58 times 63 minus 17?", "58×63−17", "Compute 58*63-17."])
def test_arithmetic_in_words_reads_as_the_world_s_problem(message):
    assert read_problem(message) == "58*63-17"


@pytest.mark.parametrize("message", ["58*63-17=3637", "-58*63-17", "58*63-17+5", "1+2", "58*63", "add 2: 58*63-17",
                                     "shift 3: hello", "hello there", "58*63-1.5"])
def test_what_is_not_the_world_s_arithmetic_is_not_read_as_it(message):
    assert read_problem(message) is None


@pytest.mark.parametrize("message, instruction, x", [
    ("shift 3: hello", "shift 3", "hello"), ("Shift 3 : hello", "shift 3", "hello"),
    ("shift-3: hello", "shift 3", "hello"),
    ("add 2: 123", "add 2", "123"), ("replace e a: hello", "replace e a", "hello"),
    ("replace e with a: hello", "replace e a", "hello"), ("replace-ea: hello", "replace e a", "hello")])
def test_transformations_read_with_their_instruction(message, instruction, x):
    t, got = read_transform(message)
    assert (t.instruction, got) == (instruction, x)


@pytest.mark.parametrize("message", ["shift: hello", "shift x: hello", "add 2:", "replace 1 2: x", "58*63-17",
                                     "hello there"])
def test_what_is_not_a_transformation_is_not_read_as_one(message):
    assert read_transform(message) is None


def _skills_run(run) -> set[str]:
    """Every skill or tool a run used besides the model writing its answer."""
    return {e["kind"] for e in run.trace.of("node") if e["kind"] in ("ask", "score", "tool")} | \
        {e["skill"] for e in run.trace.of("score")}


def test_session_answers_arithmetic_in_words_as_the_bare_problem(session):
    b, c, a = 58, 63, 17
    session.reset()
    worded = session.turn(f"What is {b}*{c}-{a}?")
    assert session.route.kind == "arithmetic" and session.route.prompt == f"{b}*{c}-{a}"
    assert "reading this as the arithmetic problem 58*63-17" in session.route.note
    assert worded.trace.of("run_start")[0]["prompt"] == f"{b}*{c}-{a}"  # what the model was given
    bare = session.turn(f"{b}*{c}-{a}")
    assert parse_answer(worded.text) == parse_answer(bare.text) == b * c - a
    assert {"ask", "tool", "verifier"} <= _skills_run(worded)
    assert session.history[0] == {"role": "user", "content": f"{b}*{c}-{a}"}
    session.reset()


def test_session_answers_a_transformation_with_its_task_adapter_and_no_arithmetic_skill(session):
    want = Transform("replace", "l x").apply("hello")
    assert want != "hello"
    session.reset()
    run = session.turn("replace l x: hello")
    assert run.text.strip() == want
    assert session.route.kind == "transform" and session.route.adapter == "replace-lx"
    assert run.trace.of("run_start")[0]["prompt"] == "replace: hello"  # as the task adapters were trained
    steps = [e for e in run.trace.of("node") if e["kind"] == "generate"]
    assert steps and all(e["adapter"] == "replace-lx" for e in steps)
    assert _skills_run(run) == set()  # no tool selector, calculator or verifier: replace-lx has no checker
    assert "not arithmetic: no calculator, no arithmetic verifier" in session.route.note
    session.reset()


def test_session_scores_a_transformation_with_its_own_verifier_only(session):
    task = sorted(session.task_checkers)[0]
    t = Transform.parse(task)
    x = next(s for s in t.inputs(8, 0, "test") if t.apply(s) != s)
    run = session.turn(f"{task}: {x}")
    checker = session.task_checkers[task]
    assert checker.startswith("check-") and session.route.verifier == checker
    assert [e["skill"] for e in run.trace.of("score")] == [checker]
    assert run.trace.of("run_start")[0]["prompt"] == t.prompt(x)
    session.reset()


def test_session_runs_no_arithmetic_skill_on_anything_else(session):
    session.reset()
    run = session.turn("hello there")
    assert session.route.kind == "other" and session.route.prompt == "hello there"
    assert _skills_run(run) == set() and not run.trace.of("adapter")
    assert all(e.get("adapter") in (None, "base") for e in run.trace.of("node") if e["kind"] == "generate")
    session.reset()


def test_session_adapter_choice_wins_over_the_task_adapter(session):
    session.set_adapter("shift-2")
    try:
        run = session.turn("replace l x: hello")
        assert session.route.adapter == "shift-2" and session.route.verifier is None
        assert all(e["adapter"] == "shift-2" for e in run.trace.of("node") if e["kind"] == "generate")
        assert "the world's adapter for it is replace-lx" in session.route.note
    finally:
        session.set_adapter("base")
        session.reset()
