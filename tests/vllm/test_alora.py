"""Activated LoRA on vLLM (serving/vllm/alora.py) against kilolora's engine in this process: the
world's activated skills served *unstripped* by a real vLLM server give the engine's verifier
log-probabilities and the tool selector's greedy text, and a verifier call after a base
generation reuses the base's cached blocks (`usage.prompt_tokens_details.cached_tokens`).
Non-vacuous: the same adapter stripped to a plain LoRA (what vLLM alone can serve) scores
differently and reuses nothing. `--max-num-batched-tokens 48` splits long prompts, so a chunk
boundary lies before the invocation; `--max-loras 3` with three adapters fills every slot (where
vLLM's CPU LoRA ops, unpatched, give base tokens the last slot's adapter). Needs vLLM in this
venv (scripts/test-vllm.sh)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("vllm")

from serving.sampling import SamplingParams  # noqa: E402
from serving.vllm import alora  # noqa: E402
from serving.vllm.catalog import plain_copy  # noqa: E402
from skills import data  # noqa: E402
from skills.spec import yes_probability  # noqa: E402
from skills.tasks import problems  # noqa: E402
from skills.tokenizer import NO, SELECT, VERIFY, YES  # noqa: E402
from skills.world import World  # noqa: E402
from tests.helpers import free_port, server_process  # noqa: E402

BLOCK = 32
STARTUP_S = 300


def _entry_point_installs() -> bool:
    """Whether vLLM's entry point (`serving.vllm.plugin:register`) installs the patches, asked in a
    fresh interpreter (this one may have installed them already)."""
    code = "from serving.vllm import alora, plugin; plugin.register(); print(alora.installed())"
    env = {k: v for k, v in os.environ.items() if k != "KILOLORA_VLLM_CATALOG"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return r.stdout.strip().endswith("True")


# ------------------------------------------------------------------ no server
def test_token_mapping_maps_positions_before_the_invocation_to_the_base():
    ids, starts = np.array([3, 0, 5, 4]), np.array([10, -1, -1, alora.NEVER])
    computed, scheduled, sampled = np.array([8, 0, 4, 0]), np.array([4, 2, 1, 3]), np.array([1, 1, 1, 1])
    tok, samp = alora.token_mapping(ids, starts, computed, scheduled, sampled)
    # request 0: positions 8..11, invocation at 10; request 3: no invocation, never adapted
    assert tok.tolist() == [0, 0, 3, 3, 0, 0, 5, 0, 0, 0]
    assert samp.tolist() == [3, 0, 5, 0]


def test_find_last_is_the_last_occurrence():
    assert alora.find_last([1, 8, 2, 8, 3], [8]) == 3
    assert alora.find_last([1, 8, 9, 8, 9], [8, 9]) == 3
    assert alora.find_last([1, 2], [8]) is None


def test_block_hash_drops_the_adapter_only_before_the_invocation(tmp_path):
    assert alora.install()
    from vllm.lora.request import LoRARequest
    from vllm.v1.core import block_pool, kv_cache_utils

    assert block_pool.generate_block_hash_extra_keys is kv_cache_utils.generate_block_hash_extra_keys
    (tmp_path / "adapter_config.json").write_text(json.dumps({"alora_invocation_tokens": [8]}))

    class Req:  # the fields generate_block_hash_extra_keys reads
        mm_features, cache_salt, prompt_embeds = [], None, None
        prompt_token_ids = [5] * 40 + [8] + [6] * 30
        lora_request = LoRARequest("v", 1, str(tmp_path))

    keys = [kv_cache_utils.generate_block_hash_extra_keys(Req(), s, s + BLOCK, 0)[0] for s in (0, 32, 64)]
    assert keys[0] is None  # [0, 32) ends before the invocation at 40: the base's block
    assert keys[1] == keys[2] == (("lora", "v", str(tmp_path)),)


def test_tokens_without_an_adapter_get_no_lora_term_when_every_slot_is_full():
    import torch

    assert alora.install()
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    torch.manual_seed(0)
    a, b = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 6, 3)  # (slots, 1, out, in): both slots hold adapters
    x, idx = torch.randn(4, 8), torch.tensor([0, -1, 1, -1])
    mid, out = torch.zeros(4, 3), torch.zeros(4, 6)
    punica_cpu.bgmv_shrink(x, a, mid, idx, 1.0)
    punica_cpu.bgmv_expand(mid, b, out, idx, True)
    ref = torch.stack([b[i, 0] @ a[i, 0] @ x[t] if i >= 0 else torch.zeros(6) for t, i in enumerate(idx.tolist())])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert lora_ops.sgmv_shrink.__module__ == lora_ops.__name__  # sgmv_* reach the patched bgmv_* by name


def test_other_vllm_versions_are_not_patched():
    assert alora.supported("0.32.0") and alora.supported("0.32.1rc1")
    assert not alora.supported("0.33.0") and not alora.supported("0.31.2") and not alora.supported("dev")


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def world():
    return World.load()


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """vLLM with the verifier and the tool selector as activated adapters, and `verifier-plain`
    (the verifier stripped to a plain LoRA); yields an `openai` client. Its log must hold no
    traceback when the tests are done."""
    import openai

    tmp = tmp_path_factory.mktemp("vllm_alora")
    skills = world.path / "skills"
    loras = {"verifier": skills / "verifier", "tool_selector": skills / "tool_selector",
             "verifier-plain": plain_copy(skills / "verifier", tmp / "cache")}
    port, log = free_port(), tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by tests/conftest.py
    # TORCHDYNAMO_DISABLE: vLLM's sampler compiles its logprob-rank helper with inductor on the
    # first `logprobs` request (vllm/v1/sample/ops/logprobs.py), 1-2 minutes of C++ builds on 2 cores
    env.update(VLLM_CPU_KVCACHE_SPACE="1", TORCHDYNAMO_DISABLE="1")
    # the patches reach vLLM's processes the way they reach users': kilolora's installed entry point
    assert _entry_point_installs(), "serving.vllm.plugin:register does not install the aLoRA patches"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(world.path / "base"),
            "--served-model-name", "base", "--port", str(port), "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "16", "--max-loras", "3", "--enable-prompt-tokens-details", "--enable-prefix-caching",
            "--block-size", str(BLOCK), "--max-num-batched-tokens", "48", "--max-num-seqs", "8",
            "--uvicorn-log-level", "warning", "--lora-modules",
            *(json.dumps({"name": n, "path": str(p), "base_model_name": "base"}) for n, p in loras.items())]
    url = f"http://127.0.0.1:{port}"
    with server_process(argv, env, log, url, ready_path="/v1/models", startup_s=STARTUP_S, what="vLLM", stop_s=30):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        served = log.read_text()  # before stopping it: shutting down logs the engine core's death
        assert "Traceback" not in served, served[-5000:]


@pytest.fixture(scope="module")
def engine(world):
    return world.engine(kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def cases(engine):
    """Per problem: the base prompt, kilolora's greedy solution, the verifier's context and
    suffix (invocation + the calculator's evidence)."""
    enc = data.Encoder(engine.tokenizer)
    out = []
    for p in problems(3, 11, "test"):
        prompt = enc.prompt(p.question)
        text = engine.generate(prompt, params=SamplingParams(max_tokens=72, temperature=0.0))[0].text
        out.append(dict(problem=p, prompt=prompt, text=text, context=data.verifier_context(enc, p, text),
                        suffix=VERIFY + data.evidence(data.calc_checks(text))))
    return enc, out


def _top(client, model: str, ids: list[int]):
    """One greedy token after `ids` under `model`: ({token id: log-probability} of the top 20, usage)."""
    r = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, logprobs=20,
                                  extra_body={"return_tokens_as_token_ids": True})
    top = r.choices[0].logprobs.top_logprobs[0]
    return {int(k.rsplit(":", 1)[1]): v for k, v in top.items()}, r.usage


def _kilolora_yes_no(engine, context: list[int], suffix: str, adapter: str | None) -> tuple[float, float]:
    seq = engine.open(context)
    try:
        (y, _), (n, _) = engine.score_many([(seq, suffix + YES, adapter), (seq, suffix + NO, adapter)])
    finally:
        engine.close(seq)
    return y[-1], n[-1]


def test_verifier_reuses_the_base_prefix_and_scores_like_kilolora(server, engine, cases):
    enc, items = cases
    yes, no = enc.ids(YES)[0], enc.ids(NO)[0]

    def base_then_verify(c):
        r = server.completions.create(model="base", prompt=c["prompt"], max_tokens=72, temperature=0)
        ids = c["context"] + enc.ids(c["suffix"])
        plain = _top(server, "verifier-plain", ids)  # first: it must not find the activated one's blocks either
        return r.choices[0].text, plain, _top(server, "verifier", ids)

    with ThreadPoolExecutor(len(items)) as pool:  # the requests of the three problems share batches
        results = list(pool.map(base_then_verify, items))
    gaps = []  # |log P(yes)| between the activated verifier and the same weights as a plain LoRA
    for c, (text, (plain_top, plain_usage), (top, usage)) in zip(items, results):
        assert text == c["text"]  # the base's greedy solution is the one kilolora wrote
        invocation = len(c["context"])
        # the base computed every context token but its last (the end token it sampled); the
        # verifier finds all its full blocks and computes from the block holding the invocation on
        assert usage.prompt_tokens == invocation + len(enc.ids(c["suffix"]))
        assert usage.prompt_tokens_details.cached_tokens == BLOCK * ((invocation - 1) // BLOCK) > 0
        assert plain_usage.prompt_tokens_details.cached_tokens == 0  # a plain LoRA's blocks are its own

        ly, ln = _kilolora_yes_no(engine, c["context"], c["suffix"], "verifier")
        assert top[yes] == pytest.approx(ly, abs=1e-4) and top[no] == pytest.approx(ln, abs=1e-4)
        by, bn = _kilolora_yes_no(engine, c["context"], c["suffix"], None)
        p, p_base = yes_probability(ly, ln), yes_probability(by, bn)
        p_plain = yes_probability(plain_top.get(yes, -math.inf), plain_top.get(no, -math.inf))
        assert abs(p - p_base) > 0.05  # the adapter matters ...
        gaps.append(abs(math.log(p) - math.log(p_plain)))  # ... and so does where it starts
        assert yes_probability(top[yes], top[no]) == pytest.approx(p, abs=1e-5)
    # every case differs from the plain LoRA far beyond the parity tolerance, some by a lot (a
    # confident `n` stays confident either way: measured 0.09 on one case, more on the others)
    assert min(gaps) > 1e-2 and max(gaps) > 0.1, gaps


def test_verifier_computed_from_scratch_in_chunks_scores_like_kilolora(server, engine, cases):
    """A context the server never saw: 48-token chunks, the first all base, the invocation in a later one."""
    enc, items = cases
    yes, no = enc.ids(YES)[0], enc.ids(NO)[0]
    c = items[0]
    context = c["context"][:1] + enc.ids("\n") + c["context"][1:]  # a new prefix: no block is cached
    ids = context + enc.ids(c["suffix"])
    top, usage = _top(server, "verifier", ids)
    assert usage.prompt_tokens_details.cached_tokens == 0 and len(context) > 48
    ly, ln = _kilolora_yes_no(engine, context, c["suffix"], "verifier")
    assert top[yes] == pytest.approx(ly, abs=1e-4) and top[no] == pytest.approx(ln, abs=1e-4)
    # the blocks it computed before the invocation are the base's: the base finds them
    r = server.completions.create(model="base", prompt=context, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == BLOCK * ((len(context) - 1) // BLOCK) > 0


def test_tool_selector_greedy_text_equals_kilolora(server, engine, cases):
    enc, items = cases
    stop = "[/CALC]"
    for c in items:
        for done in ("", c["text"].split(". ")[0] + ". "):  # at the start, and after the first step
            ids = data.selector_context(enc, c["problem"], done) + enc.ids(SELECT)
            r = server.completions.create(model="tool_selector", prompt=ids, max_tokens=24, temperature=0,
                                          stop=[stop], extra_body={"include_stop_str_in_output": True})
            ours = engine.generate(ids, adapter="tool_selector",
                                   params=SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))[0]
            base = engine.generate(ids, params=SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))[0]
            assert ours.text != base.text  # the selector, not the base, writes the call
            theirs = r.choices[0].text
            assert theirs.removesuffix(stop) == ours.text, (done, theirs, ours.text)
