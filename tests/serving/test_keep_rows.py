"""The last layer narrowed to the rows whose logits are read (`ForwardBatch.keep`): the same
tokens, log-probabilities and scores as computing every row, on the reference and the packed path,
with a dense PEFT adapter and a folded bank in the batch, through chunked prefills whose first
chunks read no row at all, and against transformers."""

from __future__ import annotations

import pytest
import torch

import serving.scheduler as scheduler_mod
from serving import Engine, SamplingParams
from serving.model import PackedWeights, Transformer
from tests.helpers import hf_teacher_forced, make_peft_adapter, make_tiny_model, teacher_forced
from tests.serving.test_packed import _bank

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def kept(monkeypatch):
    """(rows N, rows kept M) of every forward that narrowed its last layer; tiny models packed."""
    monkeypatch.setattr(PackedWeights, "FP32_MIN_HIDDEN", 0)
    monkeypatch.setattr(PackedWeights, "FP32_AMD_MIN_WEIGHT", 0)
    seen: list[tuple[int, int]] = []
    forward = Transformer.forward

    def spy(self, batch, cache, lora=None):
        out = forward(self, batch, cache, lora)
        if batch.keep is not None:
            seen.append((int(batch.tokens.shape[0]), int(batch.keep.shape[0])))
            assert out.shape[0] == batch.keep.shape[0]
        return out

    monkeypatch.setattr(Transformer, "forward", spy)
    return seen


def _run(engine: Engine, prompts: list[list[int]], adapters: list[str | None]):
    """Generate on the even prompts and score four tokens after the odd ones, all in the same steps:
    greedy tokens with their log-probabilities, scores with their ranks and top-3 lists."""
    seqs = [engine.open(p) for p in prompts]
    gens, scores = [], []
    for i, (s, a) in enumerate(zip(seqs, adapters)):
        if i % 2 == 0:
            engine.set_adapter(s, a)
            engine.submit(s, SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True))
            gens.append(s)
        else:
            scores.append(engine.submit_score(s, [5, 9, 7, 11], a, top=3))
    while any(engine.running(s) for s in gens) or any(not engine.scheduler.get(f).job.done for f in scores):
        engine.step()
    outs = engine.wait(gens)
    gen = [(o.token_ids, [t.logprob for t in o.logprobs]) for o in outs]
    sc = [engine.score_result(f) for f in scores]
    return gen, [(r.logprobs, r.ranks, r.top) for r in sc]


@pytest.mark.parametrize("packed", [False, True], ids=["reference", "packed"])
def test_narrowed_last_layer_gives_what_every_row_gives(tmp_path, monkeypatch, kept, packed):
    make_tiny_model(tmp_path / "base", seed=4)
    make_peft_adapter(tmp_path / "base", tmp_path / "lora", seed=9, target_modules=MODULES)

    def engine():
        e = Engine.from_pretrained(tmp_path / "base", adapters={"lora": tmp_path / "lora"}, packed_weights=packed,
                                   kv_cache_tokens=2048, block_size=4, max_batch_tokens=48)
        e.load_bank(_bank(e, 3), prefix="b/")
        return e

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in (60, 37, 9, 30, 44, 13, 25, 21)]
    adapters = [None, "lora", "b/e0", "b/e1", "lora", None, "b/e2", "lora"]
    monkeypatch.setattr(scheduler_mod, "KEEP_MIN_DROPPED", 1 << 30)  # every row through every layer
    want = _run(engine(), prompts, adapters)
    assert not kept
    monkeypatch.setattr(scheduler_mod, "KEEP_MIN_DROPPED", 16)
    got = _run(engine(), prompts, adapters)
    assert any(m == 0 for _, m in kept), kept  # a chunk of prompts that reads no row: keys and values only
    assert any(0 < m < n for n, m in kept), kept  # one with scored rows and last rows among others
    for (tw, lw), (tg, lg) in zip(want[0], got[0]):
        assert tg == tw
        torch.testing.assert_close(torch.tensor(lg), torch.tensor(lw), atol=1e-5, rtol=1e-5)
    for (lw, rw, aw), (lg, rg, ag) in zip(want[1], got[1]):
        torch.testing.assert_close(torch.tensor(lg), torch.tensor(lw), atol=1e-5, rtol=1e-5)
        assert rg == rw and [[t for t, _ in x] for x in ag] == [[t for t, _ in x] for x in aw]
    assert len({tuple(t) for t, _ in got[0]}) > 1


def test_narrowed_prefill_matches_transformers(tmp_path, kept):
    """A long prompt prefilled in narrowed chunks, then decoded: transformers' greedy tokens and
    teacher-forced log-probabilities at every position after it."""
    hf = make_tiny_model(tmp_path, seed=2)
    engine = Engine.from_pretrained(tmp_path, kv_cache_tokens=1024, block_size=4, max_batch_tokens=32)
    prompt = list(range(3, 60))
    out = engine.generate([prompt], params=SamplingParams(max_tokens=8, temperature=0, logprobs=0,
                                                                   ignore_eos=True))[0]
    assert any(m == 0 for _, m in kept) and any(m == 1 for _, m in kept)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == want
    ids = prompt + out.token_ids
    hf_lp = hf_teacher_forced(hf, ids)
    torch.testing.assert_close(torch.tensor([t.logprob for t in out.logprobs]), hf_lp[len(prompt) - 1:],
                               atol=2e-5, rtol=1e-4)  # the first from the narrowed chunk
    torch.testing.assert_close(teacher_forced(engine, ids, None), hf_lp, atol=2e-5, rtol=1e-4)
