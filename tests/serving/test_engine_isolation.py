"""One request's failure stays its own: the engine finishes a poisoned request with an error and
every other request of the batch with exactly the text it has alone; degenerate sampling settings
mean what they say; one group with hundreds of sequences does not starve another.

References: each good request's greedy text from the same engine with nothing else running.
"""

from __future__ import annotations

import pytest
import torch

from serving import SamplingParams
from serving.sampling import NonFiniteLogits, sample
from skills.world import World

WORLD = World.load()
PROMPTS = [f"{a}*{b}+{c}" for a, b, c in [(37, 49, 12), (58, 63, 17), (21, 34, 5), (77, 12, 40), (45, 45, 45),
                                          (19, 91, 3), (66, 23, 8), (84, 17, 29)]]


@pytest.fixture(scope="module")
def engine():
    return WORLD.engine(kv_cache_tokens=16384)


def chat(engine, content: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)


def alone(engine, prompt: str, max_tokens: int = 40) -> str:
    [c] = engine.generate(chat(engine, prompt), params=SamplingParams(temperature=0, max_tokens=max_tokens))
    return c.text


def run_with_poison(engine, poison) -> tuple[list, object]:
    """The 8 good requests and one poisoned by `poison(params)`, submitted together."""
    seqs = [engine.open(chat(engine, p)) for p in PROMPTS + [PROMPTS[0]]]
    params = [SamplingParams(temperature=0, max_tokens=40) for _ in PROMPTS]
    bad = SamplingParams(temperature=1.0, max_tokens=40)
    poison(bad)  # past validation, as a bug or a missed check would let it through
    try:
        out = engine.run(seqs, params + [bad])
    finally:
        for s in seqs:
            engine.close(s)
    return out[:-1], out[-1]


@pytest.mark.parametrize("poison", [
    pytest.param(lambda p: setattr(p, "logprobs", 10**6), id="logprobs-1e6"),  # raises while sampling the batch
    pytest.param(lambda p: setattr(p, "stop", [None]), id="stop-None"),  # raises in its own stop check
    pytest.param(lambda p: setattr(p, "top_k", 2**63), id="top_k-2^63"),  # made every step raise before
])
def test_a_poisoned_request_fails_alone(engine, poison, request):
    want = [alone(engine, p) for p in PROMPTS]
    assert len(set(want)) > 1  # the requests differ: a mixed-up batch would show
    good, bad = run_with_poison(engine, poison)
    assert [c.text for c in good] == want
    assert all(c.finish_reason in ("stop", "length") for c in good)
    if "top_k" in request.node.callspec.id:  # a top_k over the vocabulary keeps every token: no error at all
        assert bad.finish_reason in ("stop", "length") and not bad.error
    else:
        assert bad.finish_reason == "error" and bad.error
    assert engine.stats()["open_sequences"] == 0 and engine.stats()["blocks_used"] == 0
    assert [c.text for c in engine.generate([chat(engine, p) for p in PROMPTS],
                                            params=SamplingParams(temperature=0, max_tokens=40))] == want


def test_non_finite_logits_fail_their_row_only(engine, monkeypatch):
    """A row of NaN logits (a broken adapter, an overflow) is an error for that request, not a
    token drawn from garbage, and the other requests in the step keep their text."""
    want = [alone(engine, p) for p in PROMPTS[:3]]
    seqs = [engine.open(chat(engine, p)) for p in PROMPTS[:3] + ["1+1"]]
    poisoned = seqs[-1]
    real = engine.model.logits
    rows_of = {}

    def logits(hidden):
        out = real(hidden)
        if poisoned in rows_of.get("plan", []):  # the poisoned sequence's row is its index in the plan
            out[rows_of["plan"].index(poisoned)] = float("nan")
        return out

    real_execute = engine.scheduler._execute

    def execute(plan):
        rows_of["plan"] = [s.id for s, start, end in plan if end == len(s.tokens)]
        return real_execute(plan)

    monkeypatch.setattr(engine.model, "logits", logits)
    monkeypatch.setattr(engine.scheduler, "_execute", execute)
    try:
        out = engine.run(seqs, [SamplingParams(temperature=0, max_tokens=40)] * 4)
    finally:
        for s in seqs:
            engine.close(s)
    assert [c.text for c in out[:3]] == want
    assert out[3].finish_reason == "error" and "non-finite" in out[3].error


def test_sample_refuses_non_finite_rows():
    logits = torch.zeros(3, 8)
    logits[1, 2] = float("inf")
    with pytest.raises(NonFiniteLogits) as err:
        sample(logits, [SamplingParams(temperature=0)] * 3, [torch.Generator()] * 3)
    assert err.value.rows == [1]


@pytest.mark.parametrize("kw", [dict(temperature=1e-300), dict(temperature=1e-6), dict(top_p=1e-300),
                                dict(top_p=1e-45), dict(top_k=10**12)])
def test_degenerate_sampling_settings_mean_what_they_say(engine, kw):
    """A temperature below 1e-5 is greedy (it used to overflow to <unk> tokens), a top_p too small
    for float32 keeps the top token alone (greedy too), a top_k over the vocabulary keeps all."""
    prompt = chat(engine, PROMPTS[1])
    [want] = engine.generate(prompt, params=SamplingParams(temperature=0, max_tokens=40))
    [got] = engine.generate(prompt, params=SamplingParams(max_tokens=40, seed=3, **{"temperature": 1.0, **kw}))
    if "top_k" in kw:  # keeps every token: the same as no top_k at all, for the same seed
        [want] = engine.generate(prompt, params=SamplingParams(temperature=1.0, max_tokens=40, seed=3))
    assert got.text == want.text and "<unk>" not in got.text and got.finish_reason != "error"


def test_sampling_params_refuse_what_no_sampler_can_honour():
    for bad in [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=float("nan")),
                dict(top_k=True), dict(max_tokens=True), dict(seed=2**63), dict(seed=1.5), dict(stop_token_ids=["x"])]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_one_request_with_many_sequences_does_not_starve_another(engine):
    """300 sequences of one group (one HTTP request's prompts × n) and then one of another: with a
    batch of 64 tokens the victim still gets a slot in the first steps, not after the 300 finish."""
    small = type(engine)(engine.model, engine.tokenizer, kv_cache_tokens=1 << 16, max_batch_tokens=64)
    big = [small.open([5, 6, 7], group="big") for _ in range(300)]
    victim = small.open([5, 6, 8], group="victim")
    for s in big:
        small.submit(s, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    small.submit(victim, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    steps = 0
    while small.running(victim):
        small.step()
        steps += 1
    assert steps <= 9  # 1 prefill + 8 decode steps, as if it were alone (300 x 8 tokens need >= 38 steps)
    assert any(small.running(s) for s in big)  # the big request is still going: it was not simply done first
    # Without groups the same load runs oldest first, and the victim waits for a batch slot.
    plain = type(engine)(engine.model, engine.tokenizer, kv_cache_tokens=1 << 16, max_batch_tokens=64)
    seqs = [plain.open([5, 6, 7]) for _ in range(300)]
    last = plain.open([5, 6, 8])
    for s in seqs + [last]:
        plain.submit(s, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    steps = 0
    while plain.running(last):
        plain.step()
        steps += 1
    assert steps > 9
