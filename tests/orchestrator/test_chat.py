"""`kilolora chat`: driven as a real subprocess in a pseudo-terminal (pexpect), in-process and
against `kilolora serve`, and the `ChatSession` under it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from orchestrator.chat import ChatSession
from orchestrator.executor import Executor

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

    out = subprocess.run([KILOLORA, "chat", "--url", world_server + "/v1"], input="58*6+31\n/trace\n",
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "http://" in out.stdout and "calculator" in out.stdout
    assert f"answer        {58 * 6 + 31}" in out.stdout
    assert "trace of the last turn" in out.stdout and out.stdout.rstrip().endswith("bye")


def test_chat_with_no_server_is_one_clear_error():
    import subprocess

    out = subprocess.run([KILOLORA, "chat", "--url", "http://127.0.0.1:9/v1"], input="", capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("kilolora: error: cannot reach the server")
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def session():
    return ChatSession.for_world()


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
