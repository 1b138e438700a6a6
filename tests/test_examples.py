"""Every script in examples/ runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    """Run examples/NAME as a user would; its stdout (the run must succeed)."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_compress_collection_example():
    out = run_example("compress_collection.py")
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()[1:5]}
    assert set(rows) == {"svd (per adapter)", "jd-full", "jd-diag", "jd-full, 3 clusters"}
    # 3 planted groups: one shared basis cannot hold them, three clusters can.
    assert float(rows["jd-full, 3 clusters"][1]) < 0.05 < float(rows["jd-full"][1])
    assert "saved and reloaded 200 adapters" in out


def test_serve_adapters_example():
    out = run_example("serve_adapters.py")
    assert "resident adapters: 101" in out
    rows = {line.split(":")[0].strip(): line.split(":")[1] for line in out.splitlines() if line.startswith(" ")}
    # The dense PEFT adapter and its compressed twin in the bank generate the same tokens; base differs.
    assert rows["dense_7"] == rows["adapter_0007"] != rows["base"]
    assert out.count("'prefilled': 1, 'reused': 0, 'decoded': 6") == 4  # forks share the prompt


def test_world_skills_example():
    out = run_example("world_skills.py")
    # the verifier reads the base's cached solution: only the last sampled token, its invocation
    # and the calculator's check are computed (one token per character)
    line = next(x for x in out.splitlines() if "were already in the KV cache" in x)
    check = line.split("`")[1]
    assert f"(computed {2 + len(check)} new tokens for `{check}`; the 44 before them" in line
    assert check == "vv"  # both claims of the base's solution are right
    ok, wrong = [float(line.split("= ")[1].split()[0]) for line in out.splitlines()
                 if line.startswith("verifier:") and "for '" in line]
    assert ok > wrong  # the right solution scores above the one with a wrong product
    assert "tool selector:    [CALC]58*6[/CALC]" in out
    step_ok, step_bad = [float(line.split("= ")[1].split()[0]) for line in out.splitlines()
                         if line.startswith("self-eval:")]
    assert step_ok > step_bad
    # a task adapter from the bank performs its transformation; the base alone cannot
    rows = [line.split(None, 1) for line in out.splitlines() if line.startswith("  ")]
    assert rows[0] == ["replace-lx", "replace: hello -> hexxo, replace: world -> worxd"]
    assert rows[1][0] == "base" and "hexxo" not in rows[1][1]
    assert rows[2] == ["add-7", "add: 12345 -> 89012, add: 2026 -> 9793"]


def test_best_of_n_example():
    out = run_example("best_of_n.py")
    assert out.count("  sample 0.") == 8 and out.count("<- kept") == 1
    kept = next(x for x in out.splitlines() if "<- kept" in x)
    best = max(float(x.split("= ")[1].split()[0]) for x in out.splitlines() if x.startswith("  sample"))
    assert float(kept.split("= ")[1].split()[0]) == best  # the verifier's top sample is kept
    assert "reused" in out and "best-of-8" in out


def test_tool_agent_example():
    out = run_example("tool_agent.py")
    assert out.count("tools:") == 3 and "calculator(37*49) = 1813" in out
    assert [x.split()[-1] for x in out.splitlines() if x.strip().startswith("tools:")] == ["right"] * 3
    assert "[CALC]9**9**9**9[/CALC]=[error: " in out and "[CALC]12/0[/CALC]=[error: division by zero]" in out


def test_custom_graph_example():
    out = run_example("custom_graph.py")
    assert out.startswith("flowchart TD") and "n_retry -.->|rewind| n_draft" in out
    assert out.count("verifier ") >= 2 and "rewinds" in out


def test_openai_server_example():
    out = run_example("openai_server.py")

    def said(label: str) -> str:
        (line,) = [x for x in out.splitlines() if x.startswith(label)]
        return line[len(label):].lstrip(" :").strip()

    assert said("base alone") == said("streamed")  # streaming adds up to the same text
    # the adapter picked by model name writes the task; `NAME` and `base:NAME` are the same model
    assert said("replace-lx ") == said("base:replace-lx") == "hexxo" != said("base  ")
    assert f"calculator(37*49) = {37 * 49}" in out
    assert said("with the tool").split("(")[0].strip().endswith(f"Answer: {37 * 49 + 12}")
    # the same graph gives the same picks in-process and over HTTP
    assert said("best-of-4 in-process") == said("best-of-4 over HTTP")
