"""Adapters in the engine against `peft`: standard and activated LoRA, dense and bank, mixed batches."""

from __future__ import annotations

import warnings

import pytest
import torch

from compression import CompressConfig, compress
from compression.peft_io import load_collection, save_adapter
from serving import Engine, SamplingParams
from tests.helpers import hf_teacher_forced, make_tiny_model, mixed_batch_outputs, teacher_forced

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INVOKE = [60, 61, 62]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    hf = make_tiny_model(root / "base", "llama", seed=7)
    return root, hf


@pytest.fixture(scope="module")
def std(world):
    """A standard PEFT adapter on every projection, with a rank pattern and alpha 16."""
    root, _ = world
    from transformers import AutoModelForCausalLM

    model = _peft_adapter(AutoModelForCausalLM.from_pretrained(root / "base"), root / "std", seed=11,
                          rank_pattern={"o_proj": 2}, lora_alpha=16)
    return root / "std", model


def _peft_adapter(base: torch.nn.Module, out_dir, seed: int, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=ALL_MODULES, init_lora_weights=False, task_type="CAUSAL_LM")
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(**cfg)).eval()
        # Random B is large for a 32-wide model; scale so outputs differ from base without saturating.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.mul_(0.5)
    model.save_pretrained(out_dir)
    return model


_teacher_forced, _peft_teacher_forced = teacher_forced, hf_teacher_forced


def test_standard_adapter_matches_peft(world, std):
    root, _ = world
    peft_model = std[1]
    engine = Engine.from_pretrained(root / "base", adapters={"std": root / "std"}, kv_cache_tokens=512)
    ids = list(range(3, 40))
    ours = _teacher_forced(engine, ids, "std")
    base = _teacher_forced(engine, ids, None)
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours, _peft_teacher_forced(peft_model, ids), atol=2e-5, rtol=1e-4)
    # Greedy generation equals peft's.
    want = peft_model.generate(input_ids=torch.tensor([ids[:10]]), max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    got = engine.generate([ids[:10]], adapter="std", params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert got[0].token_ids == want


def test_activated_adapter_matches_peft_and_reuses_the_prefix(world, std):
    root, _ = world
    from transformers import AutoModelForCausalLM

    peft_model = _peft_adapter(AutoModelForCausalLM.from_pretrained(root / "base"), root / "alora", seed=12,
                               alora_invocation_tokens=INVOKE, target_modules=["q_proj", "k_proj", "v_proj"])
    engine = Engine.from_pretrained(root / "base", adapters={"alora": root / "alora"}, kv_cache_tokens=512, block_size=4)
    prefix = list(range(3, 30))
    ids = prefix + INVOKE + [7, 8, 9]
    ours = _teacher_forced(engine, ids, "alora")
    base = _teacher_forced(engine, ids, None)
    start = len(prefix)
    # Before the invocation the activated adapter is the base model (positions predict token p+1).
    torch.testing.assert_close(ours[: start - 1], base[: start - 1], atol=0, rtol=0)
    assert (ours[start:] - base[start:]).abs().max() > 1e-2
    torch.testing.assert_close(ours, _peft_teacher_forced(peft_model, ids), atol=2e-5, rtol=1e-4)

    # A sequence computed under base, then scored under the activated adapter: only the new tokens
    # are computed; the prefix comes from the sequence's own blocks.
    seq = engine.open(prefix)
    engine.run([seq], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    ctx = engine.tokens(seq)
    [(scores, counters)] = engine.score_many([(seq, INVOKE + [7], "alora")])
    assert counters.prefilled == len(INVOKE) + 1 and counters.reused == 0
    want = _peft_teacher_forced(peft_model, ctx + INVOKE + [7])[len(ctx) - 1:]
    torch.testing.assert_close(torch.tensor(scores), want, atol=2e-5, rtol=1e-4)

    # A standard switch recomputes the whole context under the adapter; the second time it comes
    # from the prefix cache (full blocks keyed by tokens and adapter), except the last position.
    engine.load_adapter("std", std[0])
    [(first, counters)] = engine.score_many([(seq, [7], "std")])
    assert counters.prefilled == len(ctx) and counters.reused == 0
    [(again, counters)] = engine.score_many([(seq, [7], "std")])
    assert counters.reused == (len(ctx) - 1) // 4 * 4 and counters.prefilled == len(ctx) - counters.reused
    # the same values, not always the same bits: the cached run's few remaining queries attend
    # through the CPU decode-attention kernel (`cpu_kernels`), the full prefill through SDPA
    torch.testing.assert_close(torch.tensor(again), torch.tensor(first), atol=1e-6, rtol=1e-6)


def _random_adapters(root, n: int, seed: int, r: int = 4, modules=("q_proj", "v_proj", "down_proj")) -> list:
    """Real PEFT directories with random factors (fast to make in bulk)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
              "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    dirs = []
    for i in range(n):
        lora_A, lora_B = {}, {}
        for layer in range(2):
            for m in modules:
                part = "mlp" if m.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
                slot = f"base_model.model.model.layers.{layer}.{part}.{m}"
                d_in, d_out = shapes[m]
                lora_A[slot] = torch.randn(r, d_in, generator=g) / d_in**0.5
                lora_B[slot] = torch.randn(d_out, r, generator=g) * 0.3
        d = root / f"a{seed}_{i:03d}"
        save_adapter(d, lora_A, lora_B, {"r": r, "lora_alpha": r, "target_modules": list(modules), "peft_type": "LORA",
                                         "task_type": "CAUSAL_LM"})
        dirs.append(d)
    return dirs


def test_bank_at_full_rank_equals_the_dense_adapters(world, tmp_path):
    root, _ = world
    dirs = _random_adapters(tmp_path, 4, seed=1, r=2)
    bank = compress(load_collection([str(d) for d in dirs]), CompressConfig(method="jd-full", rank=8, clusters=1))
    assert max(e.rel_error for e in bank.entries) < 1e-5  # 4 adapters x rank 2 fit a rank-8 basis exactly
    engine = Engine.from_pretrained(root / "base", kv_cache_tokens=512)
    engine.load_bank(bank, prefix="bank/")
    for d in dirs:
        engine.load_adapter(d.name, d)
    ids = list(range(5, 35))
    base = _teacher_forced(engine, ids, None)
    for d in dirs:
        dense = _teacher_forced(engine, ids, d.name)
        assert (dense - base).abs().max() > 1e-2
        torch.testing.assert_close(_teacher_forced(engine, ids, "bank/" + d.name), dense, atol=1e-5, rtol=1e-5)


# K=1 folds its basis into the base GEMM; K>1 takes the grouped torch path (CPU) or the kernels (CUDA).
@pytest.mark.parametrize("method, clusters, rank", [("jd-full", 3, 6), ("jd-diag", 3, 6), ("jd-full", 1, 6),
                                                    ("jd-full", 2, 2), ("jd-diag", 2, 2), ("jd-full", 8, 6),
                                                    ("jd-full", 16, 10), ("jd-diag", 16, 6)])
def test_mixed_batch_of_64_equals_each_sequence_alone(world, tmp_path, method, clusters, rank):
    root, _ = world
    dense_dirs = _random_adapters(tmp_path, 24, seed=2, modules=tuple(ALL_MODULES))
    bank_dirs = _random_adapters(tmp_path, 39, seed=3)
    bank = compress(load_collection([str(d) for d in bank_dirs]), CompressConfig(method=method, rank=rank, clusters=clusters))
    engine = Engine.from_pretrained(root / "base", kv_cache_tokens=4096, block_size=8)
    bank_names = [e.name for e in engine.load_bank(bank)]
    # On CPU one cluster folds into the base GEMM; several take the grouped torch path (CUDA: the kernels).
    reg = engine.registry
    paths = (bool(reg._folded), bool(reg._grouped), bool(reg._bank))
    assert paths == ((True, False, False) if clusters == 1 else (False, True, False))
    for d in dense_dirs:
        engine.load_adapter(d.name, d)
    adapters = [None] + [d.name for d in dense_dirs] + bank_names
    assert len(set(adapters)) == 64
    outputs = mixed_batch_outputs(engine, adapters, atol=1e-4, rtol=1e-4)
    assert len(outputs) > 32  # the adapters really differ
    assert engine.blocks.num_used == 0


# rank 10 fuses q|v into R = 20 (cores as z Sᵀ) and leaves down_proj at 10 (cores as S z)
# svd: every adapter its own basis (40 clusters of one) and diagonal cores
@pytest.mark.parametrize("method, clusters, rank", [("jd-full", 8, 6), ("jd-full", 16, 10), ("jd-diag", 16, 6),
                                                    ("svd", 1, 3)])
def test_bank_of_many_clusters_equals_its_dense_export(world, tmp_path, method, clusters, rank):
    """Bank entries on the grouped CPU path score and generate like the dense LoRAs exported
    from them, in batches that take each of its layouts (all clusters padded, the present ones
    gathered, one cluster alone) and carry a base sequence."""
    from compression.peft_io import LoraAdapter

    root, _ = world
    bank = compress(load_collection([str(d) for d in _random_adapters(tmp_path, 40, seed=8)]),
                    CompressConfig(method=method, rank=rank, clusters=clusters))
    engine = Engine.from_pretrained(root / "base", kv_cache_tokens=4096, block_size=8)
    engine.load_bank(bank, prefix="bank/")
    assert engine.registry._grouped and not engine.registry._folded and not engine.registry._bank
    first = {}  # one entry per cluster, up to 12 clusters
    for e in bank.entries:
        first.setdefault(e.cluster, e.name)
    names = list(first.values())[:12]
    assert len(names) >= min(clusters, 8)
    for name in names:
        A, B = bank.factors(name)
        engine.registry.add_adapter("dense/" + name, LoraAdapter(name, {"r": rank}, A, B))
    ids = list(range(5, 35))
    base = _teacher_forced(engine, ids, None)
    for name in names[:4]:
        dense = _teacher_forced(engine, ids, "dense/" + name)
        assert (dense - base).abs().max() > 1e-2
        torch.testing.assert_close(_teacher_forced(engine, ids, "bank/" + name), dense, atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    for batch in (names, names[:3], names[:1]):
        prompts = [torch.randint(3, 64, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(len(batch) + 1)]
        got = engine.generate(prompts, adapter=[None] + ["bank/" + n for n in batch], params=params)
        want = engine.generate(prompts, adapter=[None] + ["dense/" + n for n in batch], params=params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        lp = lambda outs: torch.tensor([[t.logprob for t in o.logprobs] for o in outs])  # noqa: E731
        torch.testing.assert_close(lp(got), lp(want), atol=1e-4, rtol=1e-4)


def test_engine_through_the_triton_kernels_matches_the_torch_path(world, tmp_path, monkeypatch):
    """What CUDA runs (no folding, Triton kernels), here under TRITON_INTERPRET=1, equals CPU."""
    import serving.lora_batch as lora_batch_mod
    from serving.kernels.bank_lora import bank_lora_triton
    from serving.kernels.dense_lora import dense_lora_triton

    root, _ = world
    dense_dirs = _random_adapters(tmp_path, 3, seed=4, modules=tuple(ALL_MODULES))
    bank = compress(load_collection([str(d) for d in _random_adapters(tmp_path, 6, seed=5)]),
                    CompressConfig(method="jd-full", rank=4, clusters=1))

    def build():
        engine = Engine.from_pretrained(root / "base", kv_cache_tokens=512)
        engine.registry.fold = False
        names = [e.name for e in engine.load_bank(bank)]
        for d in dense_dirs:
            engine.load_adapter(d.name, d)
        return engine, [None] + names[:3] + [d.name for d in dense_dirs]

    params = SamplingParams(max_tokens=3, temperature=0, logprobs=0, ignore_eos=True)
    prompts = [[5 + i, 9, 11, 3 + i] for i in range(7)]
    engine, adapters = build()
    want = engine.generate(prompts, adapter=adapters, params=params)
    calls = {"bank": 0, "dense": 0}

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(lora_batch_mod, "bank_lora", counted("bank", bank_lora_triton))
    monkeypatch.setattr(lora_batch_mod, "dense_lora", counted("dense", dense_lora_triton))
    engine, adapters = build()
    got = engine.generate(prompts, adapter=adapters, params=params)
    assert calls["bank"] > 0 and calls["dense"] > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    torch.testing.assert_close(torch.tensor([[t.logprob for t in o.logprobs] for o in got]),
                               torch.tensor([[t.logprob for t in o.logprobs] for o in want]), atol=1e-4, rtol=1e-4)


def test_unload_and_reload_under_the_same_name_never_serves_stale_cache(world, tmp_path):
    root, _ = world
    first, second = _random_adapters(tmp_path, 2, seed=6, modules=tuple(ALL_MODULES))
    engine = Engine.from_pretrained(root / "base", kv_cache_tokens=512, block_size=4)
    prompt = list(range(3, 30))
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    engine.load_adapter("task", first)
    a = engine.generate([prompt], adapter="task", params=params)[0]
    seq = engine.open([3, 4], adapter="task")
    with pytest.raises(ValueError, match="in use"):
        engine.unload_adapter("task")
    engine.close(seq)
    engine.unload_adapter("task")
    assert "task" not in engine.adapters
    with pytest.raises(KeyError, match="no adapter named 'task'"):
        engine.generate([prompt], adapter="task", params=params)
    engine.load_adapter("task", second)
    b = engine.generate([prompt], adapter="task", params=params)[0]
    assert b.counters.reused == 0  # the old adapter's blocks are keyed by its uid, not its name
    fresh = Engine.from_pretrained(root / "base", kv_cache_tokens=512, block_size=4, adapters={"task": second})
    assert b.token_ids == fresh.generate([prompt], adapter="task", params=params)[0].token_ids
    assert [t.logprob for t in a.logprobs] != [t.logprob for t in b.logprobs]


def test_replace_swaps_an_adapter_in_place_and_never_serves_its_old_cache(world, tmp_path):
    """`replace=True` (the server's vLLM `load_inplace`) serves new weights under the same name with
    a new uid; it is refused while a sequence uses the adapter, for a bank entry, and when the new
    adapter is refused (the old one keeps serving)."""
    root, _ = world
    first, second = _random_adapters(tmp_path, 2, seed=13, modules=tuple(ALL_MODULES))
    engine = Engine.from_pretrained(root / "base", kv_cache_tokens=512, block_size=4, adapters={"task": first})
    prompt = list(range(3, 30))
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    a = engine.generate([prompt], adapter="task", params=params)[0]
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter("task", second)
    seq = engine.open([3, 4], adapter="task")
    with pytest.raises(ValueError, match="in use"):
        engine.load_adapter("task", second, replace=True)
    engine.close(seq)
    old_uid = engine.registry.get("task").uid
    info = engine.load_adapter("task", second, replace=True)
    assert info.uid != old_uid and engine.adapters == ["task"]
    b = engine.generate([prompt], adapter="task", params=params)[0]
    assert b.counters.reused == 0  # blocks computed with the old weights are keyed by the old uid
    fresh = Engine.from_pretrained(root / "base", kv_cache_tokens=512, block_size=4, adapters={"task": second})
    want = fresh.generate([prompt], adapter="task", params=params)[0]
    assert b.token_ids == want.token_ids and [t.logprob for t in a.logprobs] != [t.logprob for t in b.logprobs]
    torch.testing.assert_close(torch.tensor([t.logprob for t in b.logprobs]),
                               torch.tensor([t.logprob for t in want.logprobs]), atol=1e-5, rtol=1e-5)
    engine.registry.max_lora_rank = 2
    with pytest.raises(ValueError, match="max_lora_rank"):
        engine.load_adapter("task", first, replace=True)
    assert engine.registry.get("task").uid == info.uid
    assert engine.generate([prompt], adapter="task", params=params)[0].token_ids == b.token_ids
    engine.load_bank(compress(load_collection([str(d) for d in _random_adapters(tmp_path, 3, seed=14)]),
                              CompressConfig(method="jd-full", rank=2, clusters=1)), prefix="bank/")
    with pytest.raises(ValueError, match="bank entry"):
        engine.load_adapter(engine.adapters[-1], first, replace=True)
