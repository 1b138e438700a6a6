"""Engine behaviour: continuous batching, prefix cache, fork/rewind, sampling, stops, memory."""

from __future__ import annotations

import pytest
import torch

from serving import Engine, SamplingParams
from serving.sampling import sample
from tests.helpers import make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine")
    make_tiny_model(path, "llama", seed=9)
    return path


@pytest.fixture()
def engine(model_dir):
    return Engine.from_pretrained(model_dir, kv_cache_tokens=1024, block_size=4)


def _fresh(model_dir, prompt, params=GREEDY):
    """Reference: a brand-new engine (empty cache) running the prompt alone."""
    return Engine.from_pretrained(model_dir, kv_cache_tokens=1024, block_size=4).generate([prompt], params=params)[0]


def test_prefix_cache_serves_repeated_prompts(engine, model_dir):
    prompt = list(range(3, 30))  # 27 tokens = 6 full blocks of 4 + 3
    first = engine.generate([prompt], params=GREEDY)[0]
    second = engine.generate([prompt], params=GREEDY)[0]
    assert first.counters.reused == 0 and first.counters.prefilled == 27
    assert second.counters.reused == 24 and second.counters.prefilled == 3
    assert first.token_ids == second.token_ids == _fresh(model_dir, prompt).token_ids
    assert engine.blocks.num_used == 0


def test_chunked_prefill_equals_one_shot(model_dir):
    small = Engine.from_pretrained(model_dir, kv_cache_tokens=1024, block_size=4, max_batch_tokens=7)
    prompts = [list(range(3, 40)), list(range(20, 33))]
    outs = small.generate(prompts, params=GREEDY)
    assert [o.token_ids for o in outs] == [_fresh(model_dir, p).token_ids for p in prompts]
    assert small.steps > 8  # 50 prompt tokens through a 7-token budget really were chunked


def test_continuous_batching_join_and_leave(engine, model_dir):
    a, b = list(range(3, 20)), list(range(40, 50))
    sa = engine.open(a)
    engine.submit(sa, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    sb = engine.open(b)
    engine.submit(sb, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    done = {}
    while engine.has_work():
        for d in engine.step():
            if d.finished:
                done[d.seq] = d.finished
    assert done[sb].token_ids == _fresh(model_dir, b, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)).token_ids
    assert done[sa].token_ids == _fresh(model_dir, a, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).token_ids


def test_fork_shares_the_prompt_and_frees_everything(engine, model_dir):
    prompt = list(range(3, 25))
    root = engine.open(prompt)
    engine.run([root], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    used_before = engine.blocks.num_used
    forks = engine.fork(root, 4)
    assert engine.blocks.num_used == used_before  # shared, not copied
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=123, ignore_eos=True)
    outs = engine.run(forks, params)
    assert all(o.counters.prefilled == 1 and o.counters.decoded == 6 for o in outs)  # prompt never recomputed
    assert len({tuple(o.token_ids) for o in outs}) > 1  # seed + i: different samples per fork
    # Same seeds again from a fresh engine give the same samples.
    e2 = Engine.from_pretrained(model_dir, kv_cache_tokens=1024, block_size=4)
    r2 = e2.open(prompt)
    e2.run([r2], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in e2.run(e2.fork(r2, 4), params)] == [o.token_ids for o in outs]
    for s in forks + [root]:
        engine.close(s)
    assert engine.blocks.num_used == 0


def test_forks_copy_a_shared_partial_block_before_writing(engine, model_dir):
    """Forks of a context that ends inside a block each write their own copy of that block (copy
    on write): every fork, and the parent after them, continues as a fresh engine would on its
    own context."""
    prompt = list(range(3, 25))  # 22 tokens: the last of 6 blocks holds 2, shared by the forks
    root = engine.open(prompt)
    assert engine.submit_prefill(root)
    engine.wait([root])
    forks = engine.fork(root, 3)
    tails = [[40, 41], [42], [43, 44, 45]]
    for f, t in zip(forks, tails):
        engine.extend(f, t)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)

    def same(got, ctx):  # the tiny random model's greedy tokens barely depend on the context: its logprobs do
        ref = _fresh(model_dir, ctx, params)
        assert got.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor([t.logprob for t in got.logprobs]),
                                   torch.tensor([t.logprob for t in ref.logprobs]), atol=1e-4, rtol=0)

    outs = engine.run(forks, params)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # non-vacuous: the contexts differ
    for o, t in zip(outs, tails):
        same(o, prompt + t)
    same(engine.run([root], params)[0], prompt)
    for s in forks + [root]:
        engine.close(s)
    assert engine.blocks.num_used == 0


def test_rewind_then_regenerate_matches_a_run_without_cache(engine, model_dir):
    prompt = list(range(10, 23))
    seq = engine.open(prompt)
    full = engine.run([seq], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    engine.rewind(seq, len(prompt) + 3)
    assert engine.tokens(seq) == prompt + full.token_ids[:3]
    again = engine.run([seq], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert again.token_ids == full.token_ids[3:]
    assert again.counters.prefilled <= 1  # the kept prefix is reused
    # Rewind into the prompt and continue differently: equals a fresh run on the new context.
    engine.rewind(seq, 6)
    engine.extend(seq, [50, 51, 52])
    out = engine.run([seq], GREEDY)[0]
    assert out.token_ids == _fresh(model_dir, prompt[:6] + [50, 51, 52]).token_ids
    engine.close(seq)
    assert engine.blocks.num_used == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    alone = engine.generate([[3, 4, 5]], params=p)[0]
    crowd = engine.generate([[3, 4, 5], [9, 9, 9, 9], [20, 21]], params=[p, SamplingParams(max_tokens=3, seed=1),
                                                                        SamplingParams(max_tokens=12)])
    assert crowd[0].token_ids == alone.token_ids
    other = engine.generate([[3, 4, 5]], params=SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True))
    assert other[0].token_ids != alone.token_ids


def test_sampler_follows_the_distribution_and_its_filters():
    torch.manual_seed(0)
    logits = torch.randn(1, 8) * 2
    probs = logits.softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, [SamplingParams()], [g]) for _ in range(4000)])[:, 0]
    freq = torch.bincount(draws, minlength=8).float() / 4000
    assert (freq - probs).abs().max() < 0.03
    # top_k=2 draws only the two most likely tokens; a tiny top_p only the most likely.
    top2 = set(logits[0].topk(2).indices.tolist())
    drawn = {int(sample(logits, [SamplingParams(top_k=2)], [g])) for _ in range(200)}
    assert drawn <= top2 and len(drawn) == 2
    assert {int(sample(logits, [SamplingParams(top_p=0.01)], [g])) for _ in range(50)} == {int(logits.argmax())}
    # temperature 0 is greedy even next to sampled rows.
    rows = logits.repeat(3, 1)
    out = sample(rows, [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0)], [g, g, g])
    assert out[0] == out[2] == logits.argmax()


def test_stop_strings_stop_tokens_and_streaming(engine):
    free = engine.generate(["ab"], params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(free.text) == 12 and free.finish_reason == "length"
    stop = free.text[5:7]
    cut = free.text.find(stop)
    out = engine.generate(["ab"], params=SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.text == free.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    tok = free.token_ids[4]
    out = engine.generate(["ab"], params=SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[tok], ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(tok) + 1] and out.stop_reason == tok
    # Streaming pieces add up to the completion; a stop string never leaks into the stream.
    deltas = list(engine.stream("ab", params=SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True)))
    assert "".join(d.text for d in deltas) == free.text[:cut]
    assert deltas[-1].finished is not None and sum(len(d.token_ids) for d in deltas) == len(deltas[-1].finished.token_ids)
    assert engine.blocks.num_used == 0


def test_requests_that_do_not_fit_wait_or_fail_cleanly(model_dir):
    engine = Engine.from_pretrained(model_dir, kv_cache_tokens=64, block_size=4)  # 16 blocks
    with pytest.raises(ValueError, match="KV cache"):
        engine.generate([list(range(3, 60))], params=SamplingParams(max_tokens=20))
    # Eight requests of 20 tokens need 40 blocks at once: they queue/preempt, and all are right.
    prompts = [[3 + i, 4, 5, 6, 7, 8, 9, 10] for i in range(8)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, params=params)
    ref = Engine.from_pretrained(model_dir, kv_cache_tokens=4096, block_size=4)
    assert [o.token_ids for o in outs] == [ref.generate([p], params=params)[0].token_ids for p in prompts]
    assert engine.blocks.num_used == 0
    # Idle sequences holding the whole cache: a new job ends with a clear error, nothing crashes.
    hogs = [engine.open(list(range(3 + i, 19 + i))) for i in range(4)]  # distinct: no sharing
    for h in hogs:
        engine.run([h], SamplingParams(max_tokens=1, ignore_eos=True))
    bad = engine.generate([list(range(20, 30))], params=params)[0]
    assert bad.finish_reason == "error" and "KV cache full" in bad.error
    for h in hogs:
        engine.close(h)
    assert engine.generate([list(range(20, 30))], params=params)[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(logprobs=99), "logprobs"), (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_sequence_operations(engine):
    seq = engine.open([3, 4, 5])
    with pytest.raises(ValueError, match="rewind position"):
        engine.rewind(seq, 9)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        engine.extend(seq, [64])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        engine.set_adapter(seq, "nope")
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    engine.close(seq)


def test_equal_length_prefills_attend_together_as_if_alone(engine, model_dir):
    """Forks of one context, each scoring a same-length continuation (one attention group, padded
    keys) at different context lengths, give the log-probabilities each gets on its own."""
    contexts = [list(range(3, 3 + n)) for n in (5, 9, 14, 22)]  # keys of different lengths, padded
    conts = [[40, 41, 42, 43], [7, 8, 9, 10], [50, 3, 50, 3], [11, 12, 13, 14]]
    seqs = [engine.open(c) for c in contexts]
    for s in seqs:
        assert engine.submit_prefill(s)
    engine.wait(seqs)  # contexts computed: each score now prefills 4 new tokens over its cache
    steps = engine.steps
    together = engine.score_many([(s, c, None) for s, c in zip(seqs, conts)])
    assert engine.steps == steps + 1  # all four in one forward
    for s in seqs:
        engine.close(s)
    for ctx, cont, (scores, _) in zip(contexts, conts, together):
        alone = Engine.from_pretrained(model_dir, kv_cache_tokens=1024, block_size=4)
        ref = alone.score(alone.open(ctx), cont)
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(ref), atol=1e-5, rtol=1e-5)
    assert len({tuple(s) for s, _ in together}) == 4  # non-vacuous: the continuations differ


def test_prefix_keys_are_sha256_chains_the_same_in_every_process():
    """A full block's key is sha256 over its parent's key, its tokens and their adapter uids: the
    same in another process (another PYTHONHASHSEED) and different for another adapter, parent or
    order, where Python's tuple hash, the old key, collides by construction (hash(-1) == hash(-2))."""
    import hashlib
    import os
    import struct
    import subprocess
    import sys
    from pathlib import Path

    from serving.blocks import ROOT_KEY, block_key

    tokens, uids = [5, 9, 11, 3], [-1, -1, 0, 0]
    first = block_key(None, tokens, uids)
    second = block_key(first, [7, 7, 7, 7], [-1] * 4)
    assert first == hashlib.sha256(ROOT_KEY + struct.pack("<9q", 4, *tokens, *uids)).digest()
    code = ("from serving.blocks import block_key; a = block_key(None, [5, 9, 11, 3], [-1, -1, 0, 0]); "
            "print(a.hex(), block_key(a, [7] * 4, [-1] * 4).hex())")
    for seed in ("0", "4242"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        assert out.stdout.split() == [first.hex(), second.hex()]
    others = [block_key(None, tokens, [-1, -1, 1, 1]), block_key(None, tokens, [-1] * 4),
              block_key(second, tokens, uids), block_key(None, tokens[::-1], uids), block_key(None, tokens[:2], uids[:2])]
    assert len({first, second, *others}) == 7
    assert hash((None, (5,), (-1,))) == hash((None, (5,), (-2,)))
    assert block_key(None, [5], [-1]) != block_key(None, [5], [-2])
