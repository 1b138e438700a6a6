"""vLLM's sampling extras in the engine's sampler: repetition / presence / frequency penalties,
min_p, min_tokens, stop_token_ids and skip_special_tokens.

References, written here in plain Python per sequence: the penalties of vLLM's `apply_penalties`
(`vllm/model_executor/layers/utils.py`) and min_tokens' mask over one row of logits; the
distribution after temperature, min_p, top-k and top-p (vLLM's order), sampled with the same
exponential race the sampler uses; greedy decoding from transformers' logits; vLLM's stop rules
(`vllm/v1/engine/detokenizer.py`: stop strings ending in the first min_tokens tokens' text do not
count; a stop token's text is not output); `tokenizer.decode` of the whole output.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from serving import Engine, SamplingParams
from serving.model import load_model
from serving.sampling import penalize, sample
from serving.sequence import IncrementalDetokenizer
from skills.world import World
from tests.helpers import make_tiny_model, save_char_tokenizer
from tests.serving.test_engine_text import _byte_level, _sentencepiece, _streams

EOS = {2}  # the tiny configs' and the char tokenizer's <eos>
VOCAB = 64


# ------------------------------------------------------------------ references
def ref_penalize(row: list[float], prompt: list[int], output: list[int], p: SamplingParams,
                 eos: set[int]) -> list[float]:
    counts = Counter(output)
    seen = set(prompt) | set(output)
    out = []
    for t, x in enumerate(row):
        if t in seen:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        x -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
        out.append(x)
    if len(output) < p.min_tokens:
        for t in eos | set(p.stop_token_ids):
            if t < len(out):
                out[t] = -math.inf
    return out


def ref_probs(row: list[float], p: SamplingParams) -> list[float]:
    """Temperature, then min_p, top-k, top-p, each over what the previous step kept."""
    x = [v / p.temperature for v in row]
    m = max(x)
    probs = [math.exp(v - m) for v in x]
    probs = [q / sum(probs) for q in probs]
    keep = {t for t, q in enumerate(probs) if q >= p.min_p * max(probs)}
    order = sorted(keep, key=lambda t: -probs[t])
    if p.top_k:
        order = order[: p.top_k]
    mass, total, kept = 0.0, sum(probs[t] for t in order), []
    for t in order:
        if kept and mass >= p.top_p:
            break
        kept.append(t)
        mass += probs[t] / total
    z = sum(probs[t] for t in kept)
    return [probs[t] / z if t in kept else 0.0 for t in range(len(row))]


def ref_token(row: list[float], p: SamplingParams, noise: list[float]) -> int:
    if p.greedy:
        return max(range(len(row)), key=lambda t: row[t])
    probs = ref_probs(row, p)
    return max(range(len(row)), key=lambda t: probs[t] / noise[t])


def noise_of(seed: int) -> list[float]:
    """The Exp(1) draws `sample` makes for one row with a generator seeded `seed`."""
    return torch.empty(VOCAB).exponential_(generator=torch.Generator().manual_seed(seed)).tolist()


MIXED = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(repetition_penalty=0.6, temperature=0.7),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=0.9, presence_penalty=-0.5),
    SamplingParams(frequency_penalty=-2, temperature=0),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.4, min_p=0.1, top_k=20),
    SamplingParams(min_p=0.3),
    SamplingParams(min_p=0.05, top_p=0.8, temperature=1.3),
    SamplingParams(min_tokens=8, stop_token_ids=[5, 7, 300]),
    SamplingParams(min_tokens=3, repetition_penalty=2.0, temperature=0),
    SamplingParams(temperature=0, top_k=3),
    SamplingParams(top_p=0.5),
]


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(MIXED), VOCAB, generator=g) * 3  # (B, V)
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in MIXED]
    outputs = [torch.randint(0, 12, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in MIXED]  # a small alphabet: tokens repeat
    return logits, prompts, outputs


def _penalize(logits, params, prompts, outputs):
    return penalize(logits, params, outputs, [torch.tensor(sorted(set(p))) for p in prompts], EOS)


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=True), "repetition_penalty"), (dict(repetition_penalty=10**400), "repetition_penalty"),
    (dict(presence_penalty=2.01), "presence_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(presence_penalty=False), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty"), (dict(frequency_penalty="0.5"), "frequency_penalty"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(min_p=True), "min_p"), (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=1.0), "min_tokens"),
    (dict(min_tokens=True), "min_tokens"), (dict(min_tokens=17), r"min_tokens .*max_tokens=16"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(skip_special_tokens=None), "skip_special_tokens"), (dict(skip_special_tokens=1), "skip_special_tokens"),
    (dict(temperature=True), "temperature"), (dict(top_p=True), "top_p"), (dict(ignore_eos="no"), "ignore_eos"),
])
def test_extras_refuse_what_vllm_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_extras_accept_their_bounds():
    for kw in [dict(repetition_penalty=1e-3), dict(repetition_penalty=50), dict(presence_penalty=-2),
               dict(presence_penalty=2), dict(frequency_penalty=-2.0), dict(frequency_penalty=2), dict(min_p=0),
               dict(min_p=1), dict(min_tokens=16), dict(min_tokens=0), dict(skip_special_tokens=False)]:
        SamplingParams(**kw)
    assert SamplingParams(stop_token_ids=[4, 9, 4]).stop_token_ids == [4, 9]  # deduplicated, as vLLM
    d = SamplingParams()
    assert (d.repetition_penalty, d.presence_penalty, d.frequency_penalty, d.min_p, d.min_tokens,
            d.skip_special_tokens) == (1.0, 0.0, 0.0, 0.0, 0, True) and not d.penalized


# --------------------------------------------------------- the sampler itself
def test_penalties_and_min_tokens_equal_the_reference_row_by_row():
    for seed in range(4):
        logits, prompts, outputs = _batch(seed)
        got = _penalize(logits, MIXED, prompts, outputs)
        changed = 0
        for i, p in enumerate(MIXED):
            want = torch.tensor(ref_penalize(logits[i].tolist(), prompts[i], outputs[i], p, EOS))
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
            if not (p.penalized or len(outputs[i]) < p.min_tokens):
                assert torch.equal(got[i], logits[i])  # a row without extras is left exactly as it was
            changed += not torch.equal(got[i], logits[i])
        assert changed >= 6  # non-vacuous: most rows with extras really changed


def test_sampled_tokens_equal_the_reference_distribution_with_the_same_noise():
    differs = 0
    for seed in range(20):
        logits, prompts, outputs = _batch(100 + seed)
        gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(MIXED))]
        toks = sample(_penalize(logits, MIXED, prompts, outputs), MIXED, gens).tolist()
        for i, p in enumerate(MIXED):
            row = ref_penalize(logits[i].tolist(), prompts[i], outputs[i], p, EOS)
            assert toks[i] == ref_token(row, p, noise_of(seed * 100 + i)), (seed, i, p)
            plain = ref_token(logits[i].tolist(), SamplingParams(temperature=p.temperature, top_k=p.top_k,
                                                                 top_p=p.top_p), noise_of(seed * 100 + i))
            differs += toks[i] != plain
    assert differs > 25  # the extras changed many draws (39 of 260)


def test_min_p_keeps_exactly_the_tokens_over_its_floor():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    p = SamplingParams(min_p=0.2, temperature=0.8)
    allowed = {t for t, q in enumerate(ref_probs(logits[0].tolist(), p)) if q > 0}
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, [p], [g])) for _ in range(400)}
    assert drawn == allowed and 1 < len(allowed) < 10


def test_a_mixed_batch_samples_what_each_row_samples_alone():
    logits, prompts, outputs = _batch(7)
    together = sample(_penalize(logits, MIXED, prompts, outputs), MIXED,
                      [torch.Generator().manual_seed(i) for i in range(len(MIXED))])
    for i, p in enumerate(MIXED):
        x = _penalize(logits[i: i + 1], [p], prompts[i: i + 1], outputs[i: i + 1])
        assert int(sample(x, [p], [torch.Generator().manual_seed(i)])) == int(together[i]), p


def test_a_batch_without_extras_pays_nothing(monkeypatch):
    from serving import sampling

    logits, prompts, outputs = _batch(1)
    plain = [SamplingParams(temperature=0.5, top_k=5), SamplingParams(min_tokens=3)] * 3
    outputs = [[1, 2, 3]] * 6  # min_tokens=3 is met: nothing to mask
    monkeypatch.setattr(sampling, "_penalties", lambda *a: pytest.fail("penalties ran for a batch without any"))
    x = logits[:6]
    assert penalize(x, plain, outputs, [None] * 6, EOS) is x  # no copy, no mask, no counts


def test_non_finite_rows_are_still_refused_under_a_mask():
    from serving.sampling import NonFiniteLogits

    logits = torch.zeros(3, VOCAB)
    logits[1, 2] = float("inf")  # +inf on EOS, which min_tokens masks: still an error for row 1 only
    with pytest.raises(NonFiniteLogits) as err:
        penalize(logits, [SamplingParams(min_tokens=2)] * 3, [[]] * 3, [None] * 3, EOS)
    assert err.value.rows == [1]
    masked = torch.zeros(2, VOCAB)
    masked[0, 5] = -math.inf  # a masked token is no error; a row with nothing left is
    masked[1] = -math.inf
    with pytest.raises(NonFiniteLogits) as err:
        sample(masked, [SamplingParams()] * 2, [torch.Generator()] * 2)
    assert err.value.rows == [1]


# ------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("extras")
    hf = make_tiny_model(path, "llama", seed=11)
    return path, hf


def _hf_greedy(hf, prompt: list[int], p: SamplingParams, n: int) -> list[int]:
    """Greedy decoding from transformers' logits under the reference penalties."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            row = hf(input_ids=torch.tensor([prompt + out])).logits[0, -1].tolist()
        row = ref_penalize(row, prompt, out, p, EOS)
        out.append(max(range(len(row)), key=lambda t: row[t]))
    return out


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.7),
                                dict(frequency_penalty=0.6), dict(presence_penalty=1.2),
                                dict(repetition_penalty=1.2, frequency_penalty=-0.3, presence_penalty=0.5)])
def test_penalized_greedy_equals_transformers_under_the_reference(tiny, kw):
    path, hf = tiny
    engine = Engine.from_pretrained(path, kv_cache_tokens=1024, block_size=4)
    prompts = [[3, 4, 5, 3, 4, 5], list(range(10, 30)), [40, 41, 40, 41, 40]]
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **kw)
    got = engine.generate(prompts, params=p)
    plain = engine.generate(prompts, params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in got] == [_hf_greedy(hf, q, p, 12) for q in prompts]
    assert [c.token_ids for c in got] != [c.token_ids for c in plain]  # the penalty changed the text
    assert engine.blocks.num_used == 0


def test_engine_batches_of_mixed_extras_equal_each_alone(tiny):
    path, _ = tiny
    engine = Engine.from_pretrained(path, kv_cache_tokens=4096, block_size=4)
    prompts = [[3 + i, 4, 5, 6, 3 + i] for i in range(len(MIXED))]
    params = [replace(p, max_tokens=10, seed=i, min_tokens=min(p.min_tokens, 10)) for i, p in enumerate(MIXED)]
    together = engine.generate(prompts, params=params)
    # `generate` seeds the i-th of a batch with seed + i: alone, the same draws need that seed.
    alone = [engine.generate([q], params=replace(p, seed=p.seed + i))[0]
             for i, (q, p) in enumerate(zip(prompts, params))]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]


@pytest.fixture(scope="module")
def world():
    W = World.load()
    engine = W.engine(kv_cache_tokens=8192)
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "37*49+12"}], tokenize=False,
                                     add_generation_prompt=True)
    return engine, tok, prompt


def test_min_tokens_prevents_an_early_eos(world):
    engine, tok, prompt = world
    [free] = engine.generate(prompt, params=SamplingParams(temperature=0, max_tokens=80))
    assert free.finish_reason == "stop" and free.token_ids[-1] in engine.eos_token_ids
    n = len(free.token_ids)  # the world's answer, ended by <|end|>
    for p in [SamplingParams(temperature=0, max_tokens=80, min_tokens=n + 10),
              SamplingParams(temperature=1.0, seed=5, max_tokens=80, min_tokens=n + 10)]:
        [c] = engine.generate(prompt, params=p)
        ids = c.token_ids
        assert not set(ids[: p.min_tokens]) & engine.eos_token_ids and len(ids) > p.min_tokens
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":  # EOS after min_tokens: no stop_reason, its text not output (vLLM)
            assert ids[-1] in engine.eos_token_ids and c.stop_reason is None
            assert c.text == tok.decode(ids[:-1], skip_special_tokens=True)
    # min_tokens under ignore_eos masks EOS too (vLLM): none in the first min_tokens tokens.
    [c] = engine.generate(prompt, params=SamplingParams(temperature=0, max_tokens=60, min_tokens=60, ignore_eos=True))
    assert len(c.token_ids) == 60 and not set(c.token_ids) & engine.eos_token_ids and c.finish_reason == "length"


def test_stop_token_ids_stop_after_min_tokens(world):
    engine, tok, prompt = world
    [free] = engine.generate(prompt, params=SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop = free.token_ids[2]
    first = free.token_ids.index(stop)
    [c] = engine.generate(prompt, params=SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop],
                                                        ignore_eos=True))
    assert c.token_ids == free.token_ids[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == tok.decode(c.token_ids[:-1], skip_special_tokens=True)  # the stop token's text is not output
    [c] = engine.generate(prompt, params=SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop],
                                                        ignore_eos=True, min_tokens=first + 3))
    assert stop not in c.token_ids[: first + 3] and c.token_ids[: first] == free.token_ids[:first]
    assert c.finish_reason == "length" or (c.token_ids[-1] == stop and c.stop_reason == stop)
    deltas = list(engine.stream(prompt, params=SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop],
                                                               ignore_eos=True)))
    assert "".join(d.text for d in deltas) == deltas[-1].finished.text == tok.decode(free.token_ids[:first])


def test_skip_special_tokens_false_keeps_them_in_the_text(world):
    engine, tok, prompt = world
    p = dict(temperature=0, max_tokens=80, ignore_eos=True)
    [skip] = engine.generate(prompt, params=SamplingParams(**p))
    [keep] = engine.generate(prompt, params=SamplingParams(**p, skip_special_tokens=False))
    assert keep.token_ids == skip.token_ids
    assert skip.text == tok.decode(skip.token_ids, skip_special_tokens=True)
    assert keep.text == tok.decode(keep.token_ids, skip_special_tokens=False)
    assert tok.eos_token in keep.text and tok.eos_token not in skip.text  # non-vacuous: specials were generated
    deltas = list(engine.stream(prompt, params=SamplingParams(**p, skip_special_tokens=False)))
    assert "".join(d.text for d in deltas) == keep.text


def _vllm_stops(tok, out: list[int], stop: list[str], min_tokens: int, eos: set[int]):
    """vLLM's end of a request that samples `out`: (text, finish_reason, stop_reason)."""
    floor = 0
    for n in range(1, len(out) + 1):
        if n > min_tokens and out[n - 1] in eos:
            return tok.decode(out[: n - 1], skip_special_tokens=True), "stop", None
        text = tok.decode(out[:n], skip_special_tokens=True)
        if n <= min_tokens:
            floor = len(text.rstrip("\ufffd"))
            continue
        hits = [(i, x) for x in stop if (i := text.find(x, max(0, floor - len(x) + 1))) >= 0]
        if hits:
            cut, which = min(hits)
            return text[:cut], "stop", which
    return tok.decode(out, skip_special_tokens=True), "length", None


def test_stop_strings_and_eos_do_not_count_before_min_tokens(tmp_path, monkeypatch):
    """Scripted tokens through the engine's step (the sampler replaced, so even a masked EOS can
    come): the final text and reasons equal vLLM's rules, and the stream adds up to the text."""
    from serving import scheduler

    tok = save_char_tokenizer(tmp_path / "tok")
    make_tiny_model(tmp_path, seed=1, tokenizer=False, max_position_embeddings=256)
    engine = Engine(load_model(tmp_path), tok, kv_cache_tokens=1024, block_size=4)
    script: list[int] = []
    monkeypatch.setattr(scheduler, "sample", lambda logits, params, gens: torch.tensor([script.pop(0)]))
    rng = random.Random(0)
    seen = Counter()
    for _ in range(150):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(4, 24)))
        out = tok.encode(text, add_special_tokens=False)
        for _ in range(rng.randint(0, 2)):
            out.insert(rng.randrange(len(out)), 2)  # EOS somewhere
        stop = rng.choice([[], ["bc"], ["a b", "c"], ["ab", "b"], ["cc"]])
        min_tokens = rng.randint(0, len(out))
        want = _vllm_stops(tok, out, stop, min_tokens, EOS)
        script[:] = list(out)
        deltas = list(engine.stream([3, 4, 5], params=SamplingParams(max_tokens=len(out), stop=stop,
                                                                      min_tokens=min_tokens)))
        done = deltas[-1].finished
        assert (done.text, done.finish_reason, done.stop_reason) == want, (out, stop, min_tokens)
        assert "".join(d.text for d in deltas) == done.text
        seen[(want[1], want[2] is None)] += 1
        seen["ignored"] += min_tokens > 0 and bool(_vllm_stops(tok, out, stop, 0, EOS)[0] != want[0])
    assert seen[("stop", False)] > 20 and seen[("stop", True)] > 10 and seen["ignored"] > 20  # non-vacuous
    assert engine.blocks.num_used == 0


@pytest.fixture(scope="module", params=["char", "byte-level", "sentencepiece"])
def tokenizer(request, tmp_path_factory):
    if request.param == "char":
        return save_char_tokenizer(tmp_path_factory.mktemp("char"))
    return _byte_level() if request.param == "byte-level" else _sentencepiece()


def test_incremental_text_keeping_special_tokens_is_the_whole_decode(tokenizer):
    """Random ids and multilingual text, with special tokens put in anywhere."""
    rng = random.Random(4)
    specials = 0
    for ids in _streams(tokenizer, 80, seed=4):
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(tokenizer.all_special_ids))
        tokens = [3, 4]
        d = IncrementalDetokenizer(tokenizer, 2, skip_special_tokens=False)
        for t in ids:
            tokens.append(t)
            d.update(tokens)
            want = tokenizer.decode(tokens[2:], skip_special_tokens=False)
            assert d.text(0, len(d)) == want and len(d) == len(want)
        specials += want != tokenizer.decode(tokens[2:], skip_special_tokens=True)
    assert specials > 30  # non-vacuous: many streams hold special tokens
