"""The HTTP backend's own behaviour (the shared graph programs run on it in test_contract.py):
sequences held as text, chat prompts from the server or a local template, streaming, and errors."""

from __future__ import annotations

import pytest

from orchestrator.backend import GenRequest
from orchestrator.http_backend import HttpBackend, ServerError
from orchestrator.world import world_backend
from skills.world import World


@pytest.fixture(scope="module")
def http(world_server):
    b = HttpBackend(world_server + "/v1")
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def local():
    return world_backend()


def test_chat_prompts_match_the_in_process_template(http, local):
    msgs = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "Answer: 3"},
            {"role": "user", "content": "37*49+12"}]
    assert http.chat_prompt("37*49+12") == local.chat_prompt("37*49+12")
    assert http.chat_prompt(msgs) == local.chat_prompt(msgs)
    tok = World.load().tokenizer()
    offline = HttpBackend("http://127.0.0.1:9/v1", chat_template=tok.chat_template, bos_token=tok.bos_token)
    assert offline.chat_prompt(msgs) == local.chat_prompt(msgs)  # rendered here, no request sent


def test_sequences_are_text_that_forks_rewinds_and_grows_with_generation(http, local):
    prompt = http.chat_prompt("37*49+12")
    s = http.open(prompt)
    start = http.mark(s)
    (f,) = http.fork(s, 1)
    http.extend(f, "37*49=")
    assert http.text(f, start) == "37*49=" and http.text(s, start) == ""
    mark = http.mark(f)
    [r] = http.generate([GenRequest(f, None, 16, stop=["."])])
    assert r.finish_reason == "stop" and r.text.endswith(".") and http.text(f, mark) == r.text
    # the same request in-process gives the same text and counts
    q = local.open(prompt)
    local.extend(q, "37*49=")
    [want] = local.generate([GenRequest(q, None, 16, stop=["."])])
    local.close(q)
    assert r.text == want.text and r.tokens.decoded == want.tokens.decoded
    assert r.tokens.prefilled + r.tokens.reused == want.tokens.prefilled + want.tokens.reused
    http.rewind(f, mark)
    assert http.text(f, start) == "37*49="
    with pytest.raises(ValueError, match="rewind mark must be in"):
        http.rewind(f, 10_000)
    for q in (s, f):
        http.close(q)
    with pytest.raises(KeyError, match="no open sequence"):
        http.text(s)


def test_streaming_adds_up_and_scoring_reads_top_logprobs(http):
    s = http.open(http.chat_prompt("58*6+31"))
    pieces: list[tuple[int, str]] = []
    [r] = http.generate([GenRequest(s, None, 40)], on_text=lambda i, t: pieces.append((i, t)))
    assert len(pieces) > 1 and {i for i, _ in pieces} == {0} and "".join(t for _, t in pieces) == r.text
    assert r.eos and r.finish_reason == "stop"
    (f,) = http.fork(s, 1)
    http.extend(f, "<|verify|>")
    [score] = http.generate([GenRequest(f, "verifier", 1, logprobs=20)])
    assert len(score.top_logprobs) == 1 and {"y", "n"} <= set(score.top_logprobs[0])
    assert score.tokens.reused > 0  # the solution's whole blocks came from the server's prefix cache


def test_scores_over_http_equal_the_in_process_scores(http, local):
    """`score` sends the sequence and the continuation as one echoed prompt (`max_tokens: 0`) and
    reads the continuation's prompt logprobs: the engine's numbers (the server's batch may sum in
    another order: 1e-4, see tests/serving/test_server_scoring.py)."""
    prompt = http.chat_prompt("37*49+12")
    solution = "37*49=1813. 1813+12=1825. Answer: 1825"
    for adapter, cont in [(None, solution), ("replace-lx", solution), ("verifier", solution + "<|verify|>y")]:
        s, q = http.open(prompt), local.open(prompt)
        before = local.engine.tokens(q)
        try:
            got, want = http.score(s, cont, adapter), local.score(q, cont, adapter)
            assert len(got) == len(want) == len(local.tokenizer.encode(cont, add_special_tokens=False))
            assert got == pytest.approx(want, abs=1e-4)
            assert http.text(s) == prompt and local.engine.tokens(q) == before  # left as they were
            if adapter is not None:  # non-vacuous: the adapter changes the scores
                assert max(abs(a - b) for a, b in zip(want, local.score(q, cont, None))) > 1e-2
        finally:
            http.close(s)
            local.close(q)
    empty, x = http.open(""), http.open("x")
    with pytest.raises(ValueError, match="non-empty context"):
        http.score(empty, "1")
    with pytest.raises(ServerError, match="answered 404"):
        http.score(x, "1", "nope")
    for q in (empty, x):
        http.close(q)


def test_server_errors_are_one_line(http, world_server):
    s = http.open("x")
    with pytest.raises(ServerError, match="answered 404: The model `nope` does not exist"):
        http.generate([GenRequest(s, "nope", 4)])
    nowhere = HttpBackend("http://127.0.0.1:9/v1")
    with pytest.raises(ServerError, match="cannot reach the server"):
        nowhere.generate([GenRequest(nowhere.open("x"))])
    with pytest.raises(ValueError, match="must be an http"):
        HttpBackend("localhost:8000")


def test_the_demo_over_http_gets_the_in_process_results(world_server):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("kilolora"))
    args = ["demo", "--problems", "6", "--n", "4", "--strategies", "greedy,best_of_n,tools", "--json", "--no-bank"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reports = []
    for extra in ([], ["--url", world_server + "/v1"]):
        p = subprocess.run([exe, *args, *extra], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr
        reports.append(json.loads(p.stdout))
    local, remote = reports
    assert local["backend"] == "in-process" and remote["backend"] == world_server + "/v1"
    for name in ("greedy", "best_of_n", "tools"):
        assert remote["strategies"][name]["correct"] == local["strategies"][name]["correct"], name
        assert remote["strategies"][name]["decoded"] == local["strategies"][name]["decoded"], name
    assert remote["example"]["text"] == local["example"]["text"]
    p = subprocess.run([exe, "demo", "--url", "http://127.0.0.1:9/v1", "--problems", "1"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 1 and "cannot reach the server" in p.stderr and "Traceback" not in p.stderr
