"""Log-likelihood scoring over HTTP: completions' `echo` with `logprobs`, `max_tokens: 0` and vLLM's
`prompt_logprobs`, as lm-evaluation-harness's `local-completions` sends them (`echo`, `logprobs: 1`,
`max_tokens: 1`, token-id prompts in batches; `lm_eval/models/openai_completions.py`).

References: the in-process engine's own `Engine.score` of the same tokens (`teacher_forced`), its
greedy generation (is a continuation the greedy one?) and, for ranks and alternatives, the world's
base model run by transformers. Tolerance: the server and the reference run the same float32
weights through the same code on the CPU; only the batch a prompt is computed in differs (other
requests' rows, chunk sizes), which changes the float32 summation order in the GEMMs and attention.
Measured: bit-identical for a prompt scored alone, at most 1.1e-5 (a bank adapter) batched with
other prompts, on log-probabilities of magnitude 1-20. `ATOL` = 1e-4 is ten times that and far
below what an adapter or a shifted position changes (checked here: > 1e-2).
"""

from __future__ import annotations

import openai
import pytest
import torch

from tests.helpers import teacher_forced
from tests.serving.server_helpers import PROBLEM, TASK, WORLD, assert_error, reference, render, sse

ATOL = 1e-4
ADAPTER = TASK[0]  # a task adapter (a bank entry)


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def pieces(tok, ids: list[int]) -> list[str]:
    return [tok.decode([t], skip_special_tokens=False) for t in ids]


def score(engine, ctx: list[int], cont: list[int], adapter: str | None) -> list[float]:
    """`Engine.score` of `cont` after `ctx` (what an lm-eval loglikelihood request asks)."""
    seq = engine.open(ctx)
    try:
        return engine.score(seq, cont, adapter=adapter)
    finally:
        engine.close(seq)


@pytest.fixture(scope="module")
def hf_logprobs():
    """log_softmax of the world's base model under transformers: (T - 1, V) for ids[1:]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(WORLD.base_dir), dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)

    return run


# ------------------------------------------------------------------------ echo, max_tokens 0
@pytest.mark.parametrize("model", ["base", ADAPTER, "verifier"])
def test_echo_scores_the_prompt_with_the_engines_numbers(client, engine, tok, model):
    adapter = None if model == "base" else model
    text = render(tok, TASK[1] if model == ADAPTER else PROBLEM) + ("Answer: 7<|verify|>y" if model == "verifier"
                                                                     else "")
    ids = ids_of(tok, text)
    want = teacher_forced(engine, ids, adapter).tolist()
    if adapter is not None:  # non-vacuous: the adapter changes the scores
        assert max(abs(a - b) for a, b in zip(want, teacher_forced(engine, ids, None).tolist())) > 1e-2
    for prompt in (text, ids):  # text, and token ids (lm-eval's tokenized_requests)
        r = client.completions.create(model=model, prompt=prompt, echo=True, max_tokens=0, logprobs=1, temperature=0)
        (c,) = r.choices
        assert c.text == text and c.finish_reason == "length"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
        lp = c.logprobs
        assert lp.tokens == pieces(tok, ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=ATOL)
        for t, x, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            # the prompt's token and the most likely one (the same when it is the greedy one)
            assert top[t] == x and 1 <= len(top) <= 2 and max(top.values()) >= x
    # the spelling `base:NAME` scores the same
    if adapter is not None:
        r = client.completions.create(model="base:" + model, prompt=ids, echo=True, max_tokens=0, logprobs=0)
        assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=ATOL)


def test_lm_eval_loglikelihood_requests_get_the_engines_scores_and_greediness(client, engine, tok):
    """lm-eval's payload: a batch of token-id prompts (context + continuation), `echo`, `logprobs: 1`,
    `max_tokens: 1`, `temperature: 0`; it sums token_logprobs[ctxlen:-1] and calls the
    continuation greedy when each of its tokens is the top one."""
    ctx = ids_of(tok, render(tok, PROBLEM))
    greedy = reference(engine, ctx, None, 6, ignore_eos=True).token_ids
    conts = [greedy, ids_of(tok, "Answer"), ids_of(tok, "12345"), greedy[:2] + ids_of(tok, "zz")]
    for model in ("base", ADAPTER):
        adapter = None if model == "base" else model
        prompts = [ctx + c for c in conts]
        r = client.completions.create(model=model, prompt=prompts, echo=True, max_tokens=1, logprobs=1,
                                      temperature=0, seed=1234)
        assert [c.index for c in r.choices] == list(range(len(conts)))
        assert r.usage.completion_tokens == len(conts)
        for c, cont, prompt in zip(r.choices, conts, prompts):
            lp = c.logprobs
            assert len(lp.tokens) == len(prompt) + 1  # the prompt, then the generated token
            [nxt] = reference(engine, prompt, adapter, 1, ignore_eos=True).token_ids
            assert c.text == tok.decode(prompt, skip_special_tokens=False) + pieces(tok, [nxt])[0]
            assert lp.tokens[-1] == pieces(tok, [nxt])[0]
            got = lp.token_logprobs[len(ctx):-1]
            want = score(engine, ctx, cont, adapter)
            assert got == pytest.approx(want, abs=ATOL) and sum(got) == pytest.approx(sum(want), abs=ATOL * len(want))
            is_greedy = all(x == max(top.values()) for x, top in zip(got, lp.top_logprobs[len(ctx):-1]))
            want_greedy = reference(engine, ctx, adapter, len(cont), ignore_eos=True).token_ids == cont
            assert is_greedy == want_greedy
        if model == "base":  # non-vacuous: the greedy continuation is seen as greedy, the others not
            assert [all(x == max(top.values()) for x, top in zip(c.logprobs.token_logprobs[len(ctx):-1],
                                                                c.logprobs.top_logprobs[len(ctx):-1]))
                    for c in r.choices] == [True, False, False, False]


def test_prompt_logprobs_have_vllms_shape_and_the_models_ranks(http, engine, tok, hf_logprobs):
    text = render(tok, PROBLEM)
    ids = ids_of(tok, text)
    body = {"model": "base", "prompt": text, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 3}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (c,) = r.json()["choices"]
    assert c["text"] == reference(engine, text, None, 3).text and c["logprobs"] is None  # no echo: the output alone
    pl = c["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    want = teacher_forced(engine, ids, None)
    hf = hf_logprobs(ids)  # (T - 1, V)
    for j, entry in enumerate(pl[1:]):
        t = ids[j + 1]
        first = next(iter(entry))
        assert first == str(t)  # the prompt's token first, then the most likely ones
        mine = entry[str(t)]
        assert mine["decoded_token"] == tok.decode([t], skip_special_tokens=False)
        assert mine["logprob"] == pytest.approx(want[j].item(), abs=ATOL)
        assert mine["logprob"] == pytest.approx(hf[j, t].item(), abs=ATOL)
        row = hf[j]
        # the rank under transformers' distribution, allowing for ties within the tolerance
        assert int((row > row[t] + ATOL).sum()) + 1 <= mine["rank"] <= int((row > row[t] - ATOL).sum()) + 1
        top = torch.topk(row, 3)
        others = [(int(k), v) for k, v in entry.items()]
        ranked = sorted(others, key=lambda kv: kv[1]["rank"])
        best = [kv for kv in ranked if kv[1]["rank"] <= 3]
        assert [v["rank"] for _, v in best] == [1, 2, 3]
        assert [v["logprob"] for _, v in best] == pytest.approx(top.values.tolist(), abs=ATOL)
        assert len(entry) == 3 + (mine["rank"] > 3)
        if mine["rank"] == 1:
            assert best[0][0] == t
    # with echo and logprobs, vLLM fills prompt_logprobs too (k = logprobs)
    r = http.post("/v1/completions", json={"model": "base", "prompt": ids, "echo": True, "max_tokens": 0,
                                           "logprobs": 2}).json()
    (c,) = r["choices"]
    assert len(c["prompt_logprobs"]) == len(ids)
    echoed = c["logprobs"]["token_logprobs"][1:]
    assert [e[str(t)]["logprob"] for e, t in zip(c["prompt_logprobs"][1:], ids[1:])] == echoed
    # both: prompt_logprobs k apart from the echo's logprobs k
    r = http.post("/v1/completions", json={"model": "base", "prompt": ids, "echo": True, "max_tokens": 0,
                                           "logprobs": 1, "prompt_logprobs": 5}).json()
    (c,) = r["choices"]
    assert all(len(e) >= 5 for e in c["prompt_logprobs"][1:])
    assert all(len(top) <= 2 for top in c["logprobs"]["top_logprobs"][1:])


def test_text_offsets_and_streamed_echo_add_up(http, tok):
    text = render(tok, PROBLEM)
    body = {"model": "base", "prompt": text, "echo": True, "max_tokens": 6, "logprobs": 2, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()
    (c,) = whole["choices"]
    lp = c["logprobs"]
    n = len(ids_of(tok, text))
    assert c["text"].startswith(text) and len(lp["tokens"]) == n + whole["usage"]["completion_tokens"]
    assert lp["text_offset"][0] == 0
    for i, (off, t) in enumerate(zip(lp["text_offset"], lp["tokens"])):
        assert c["text"][off: off + len(t)] == t, i  # each token where the text holds it
        if i + 1 < len(lp["tokens"]):
            assert lp["text_offset"][i + 1] == off + len(t)
    assert lp["text_offset"][n] == len(text)  # the completion starts where the prompt ends
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = sse(r.iter_lines())
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["text"] == text  # the echo comes first
    assert "".join(e["choices"][0]["text"] for e in chunks) == c["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for e in chunks if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"][key]] == lp[key]
    # max_tokens 0 streams the prompt, then the closing chunk
    with http.stream("POST", "/v1/completions", json={**body, "stream": True, "max_tokens": 0}) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]" and [e["choices"][0]["text"] for e in events[:-1]] == [text, ""]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_batched_prompts_and_n_are_each_scored_right(client, engine, tok):
    texts = [render(tok, PROBLEM), render(tok, TASK[1]), "1+2=3", "x"]
    ids = [ids_of(tok, t) for t in texts]
    for prompt in (texts, ids):
        r = client.completions.create(model=ADAPTER, prompt=prompt, echo=True, max_tokens=0, logprobs=0, n=2)
        assert len(r.choices) == 2 * len(texts) and r.usage.prompt_tokens == sum(map(len, ids))
        for c in r.choices:
            j = c.index // 2
            lp = c.logprobs
            assert c.text == texts[j] and lp.tokens == pieces(tok, ids[j]) and lp.token_logprobs[0] is None
            if len(ids[j]) > 1:
                want = teacher_forced(engine, ids[j], ADAPTER).tolist()
                assert lp.token_logprobs[1:] == pytest.approx(want, abs=ATOL)
            else:
                assert lp.token_logprobs == [None]  # a one-token prompt has nothing to score
    # Long prompts in one batch overflow a step's token budget (2048): some are scored in chunks
    # over several steps, each position once.
    g = torch.Generator().manual_seed(0)
    long = [torch.randint(4, 100, (int(n),), generator=g).tolist() for n in (500, 430, 470, 512, 300, 490)]
    r = client.completions.create(model="base", prompt=long, echo=True, max_tokens=0, logprobs=0)
    for c, ids_j in zip(r.choices, long):
        got = c.logprobs.token_logprobs
        assert len(got) == len(ids_j)
        assert got[1:] == pytest.approx(teacher_forced(engine, ids_j, None).tolist(), abs=ATOL)
    # echo without logprobs: the text alone, before the completion
    r = client.completions.create(model="base", prompt=texts[:2], echo=True, max_tokens=4, temperature=0)
    for c, t in zip(r.choices, texts):
        assert c.text == t + reference(engine, t, None, 4).text and c.logprobs is None


def test_a_score_longer_than_a_step_is_computed_in_chunks(engine):
    """`Engine.score` over more tokens than one step computes (max_batch_tokens) resumes where it
    stopped: the same numbers as in one step, each position scored once."""
    from serving.engine import Engine

    small = Engine.from_pretrained(WORLD.base_dir, max_batch_tokens=64, kv_cache_tokens=2048)
    ids = torch.randint(4, 100, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = small.open(ids[:1])
    [r] = small.score_ranked([(seq, ids[1:], None)], top=2)
    assert small.steps >= 300 // 64
    assert len(r.logprobs) == len(r.ranks) == len(r.top) == len(ids) - 1
    torch.testing.assert_close(torch.tensor(r.logprobs), teacher_forced(engine, ids, None), atol=ATOL, rtol=0)
    for lp, rank, top in zip(r.logprobs, r.ranks, r.top):  # alternatives from the same tensor as the score
        assert len(top) == 2 and top[0][1] >= top[1][1] and (rank == 1) == (top[0][1] == lp)


def test_bounds_are_still_enforced(http, client):
    ok = {"model": "base", "prompt": "1+2", "echo": True, "max_tokens": 0}
    assert http.post("/v1/completions", json={**ok, "logprobs": 20}).status_code == 200
    for extra, code, param in [({"logprobs": 21}, "invalid_value", "logprobs"),
                               ({"prompt_logprobs": 21}, "invalid_value", "prompt_logprobs"),
                               ({"prompt_logprobs": -1}, "unsupported_value", "prompt_logprobs"),
                               ({"max_tokens": -1}, "invalid_value", "max_tokens"),
                               ({"echo": False}, "invalid_value", None),  # max_tokens 0 needs echo
                               ({"prompt_logprobs": 1, "stream": True}, "invalid_value", None),
                               ({"prompt": [[1, 2], [10**6]]}, None, "prompt")]:
        err = assert_error(http.post("/v1/completions", json={**ok, **extra}), 400, code, param)
        if param is None and code == "invalid_value":
            assert "max_tokens 0" in err["message"] or "prompt_logprobs" in err["message"]
    limit = http.get("/v1/models/base").json()["max_model_len"]
    full = [5] * limit  # a prompt may fill the context when nothing is generated
    r = http.post("/v1/completions", json={**ok, "prompt": full, "logprobs": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == limit
    assert_error(http.post("/v1/completions", json={**ok, "prompt": full + [5]}), 400, "context_length_exceeded",
                 "prompt")
    assert_error(http.post("/v1/completions", json={**ok, "prompt": full, "max_tokens": 1}), 400,
                 "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:  # chat's echo (vLLM's: the last message) is not served
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"echo": True})
    assert (e.value.code, e.value.param) == ("unsupported_value", "echo")
