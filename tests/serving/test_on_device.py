"""The engine on the test device against transformers / peft, and through its Triton kernels
against its own torch path.

The device is CUDA when torch sees one, else CPU (`KILOLORA_TEST_DEVICE` overrides); on CPU the
Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py). The rest of tests/serving pins
the engine to CPU: this file is the subset `benchmarks/gpu_check.sh` runs on a GPU (`-k triton`:
the engine through the kernels; the rest: parity), so keep it under a minute there.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from compression import CompressConfig, compress
from compression.peft_io import load_collection
from serving import Engine, SamplingParams
from serving.kernels import triton_available
from serving.kernels.bank_lora import _interpreted
from tests.helpers import hf_teacher_forced, make_tiny_model, mixed_batch_outputs, teacher_forced
from tests.serving.test_adapters import ALL_MODULES, INVOKE, _peft_adapter, _random_adapters

DEVICE = os.environ.get("KILOLORA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
# fp32 on a GPU reorders reductions (cuBLAS split-K, our attention vs sdpa): looser than CPU's 2e-5.
FP32 = dict(atol=1e-4, rtol=1e-4)
HALF = dict(atol=0.05, rtol=0.05)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
needs_triton = pytest.mark.skipif(not (triton_available() and (DEVICE == "cuda" or _interpreted())),
                                  reason="needs triton with CUDA or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("on_device")
    make_tiny_model(root / "base", "llama", seed=7)
    return root


def _engine(root, dtype=torch.float32, **kw) -> Engine:
    return Engine.from_pretrained(root / "base", device=DEVICE, dtype=dtype, kv_cache_tokens=2048, **kw)


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).to(DEVICE, dtype).eval()


_teacher_forced = teacher_forced


def _hf_teacher_forced(model, ids: list[int]) -> torch.Tensor:
    return hf_teacher_forced(model, ids, DEVICE)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt], device=DEVICE), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_base_matches_transformers(world, dtype):
    hf, engine = _hf(world / "base", dtype), _engine(world, dtype)
    assert str(engine.registry.device).startswith(DEVICE)
    ids = list(range(3, 40))
    torch.testing.assert_close(_teacher_forced(engine, ids, None), _hf_teacher_forced(hf, ids),
                               **(FP32 if dtype == torch.float32 else HALF))
    if dtype == torch.float32:  # bf16 rounding may flip near-ties of a random model's argmax
        got = engine.generate([ids[:12]], params=GREEDY)[0].token_ids
        assert got == _hf_greedy(hf, ids[:12], 8)


def test_standard_adapter_matches_peft(world):
    from transformers import AutoModelForCausalLM

    peft_model = _peft_adapter(AutoModelForCausalLM.from_pretrained(world / "base"), world / "std", seed=11,
                               rank_pattern={"o_proj": 2}, lora_alpha=16).to(DEVICE)
    engine = _engine(world, adapters={"std": world / "std"})
    ids = list(range(3, 40))
    ours, base = _teacher_forced(engine, ids, "std"), _teacher_forced(engine, ids, None)
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours, _hf_teacher_forced(peft_model, ids), **FP32)
    got = engine.generate([ids[:10]], adapter="std", params=GREEDY)[0].token_ids
    assert got == _hf_greedy(peft_model, ids[:10], 8)


def test_activated_adapter_matches_peft(world):
    from transformers import AutoModelForCausalLM

    peft_model = _peft_adapter(AutoModelForCausalLM.from_pretrained(world / "base"), world / "alora", seed=12,
                               alora_invocation_tokens=INVOKE, target_modules=["q_proj", "k_proj", "v_proj"]).to(DEVICE)
    engine = _engine(world, adapters={"alora": world / "alora"}, block_size=4)
    prefix = list(range(3, 30))
    ids = prefix + INVOKE + [7, 8, 9]
    ours, base = _teacher_forced(engine, ids, "alora"), _teacher_forced(engine, ids, None)
    torch.testing.assert_close(ours[: len(prefix) - 1], base[: len(prefix) - 1], atol=0, rtol=0)
    assert (ours[len(prefix):] - base[len(prefix):]).abs().max() > 1e-2
    torch.testing.assert_close(ours, _hf_teacher_forced(peft_model, ids), **FP32)


@pytest.mark.parametrize("method, clusters", [("jd-full", 1), ("jd-diag", 3)])
def test_mixed_batch_equals_each_sequence_alone(world, tmp_path, method, clusters):
    """On CUDA every bank (K=1 too: nothing is folded there) and dense adapter runs the kernels."""
    dense_dirs = _random_adapters(tmp_path, 6, seed=2, modules=tuple(ALL_MODULES))
    bank = compress(load_collection([str(d) for d in _random_adapters(tmp_path, 9, seed=3)]),
                    CompressConfig(method=method, rank=6, clusters=clusters))
    engine = _engine(world, block_size=8)
    bank_names = [e.name for e in engine.load_bank(bank)]
    for d in dense_dirs:
        engine.load_adapter(d.name, d)
    adapters = [None] + [d.name for d in dense_dirs] + bank_names
    outputs = mixed_batch_outputs(engine, adapters, atol=FP32["atol"], rtol=FP32["rtol"])
    assert len(outputs) > len(adapters) // 2  # the adapters really differ
    assert engine.blocks.num_used == 0


# ----------------------------------------------------------------------------- through the kernels


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_through_triton_matches_torch_path(world, tmp_path, monkeypatch, dtype):
    """The same engine on the device, its adapter layers through the Triton kernels, then through
    the torch path (nothing folded): equal tokens (fp32) and close log-probabilities."""
    import serving.lora_batch as lora_batch_mod
    from serving.kernels.bank_lora import bank_lora_torch, bank_lora_triton
    from serving.kernels.dense_lora import dense_lora_torch, dense_lora_triton

    dense_dirs = _random_adapters(tmp_path, 3, seed=4, modules=tuple(ALL_MODULES))
    bank = compress(load_collection([str(d) for d in _random_adapters(tmp_path, 6, seed=5)]),
                    CompressConfig(method="jd-full", rank=4, clusters=2))
    prompts = [[5 + i, 9, 11, 3 + i, 17, 4] for i in range(7)]
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=0, ignore_eos=True)
    calls = {"bank": 0, "dense": 0}

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    def run(bank_fn, dense_fn):
        monkeypatch.setattr(lora_batch_mod, "bank_lora", counted("bank", bank_fn))
        monkeypatch.setattr(lora_batch_mod, "dense_lora", counted("dense", dense_fn))
        engine = _engine(world, dtype)
        engine.registry.fold = False
        names = [e.name for e in engine.load_bank(bank)]
        for d in dense_dirs:
            engine.load_adapter(d.name, d)
        adapters = [None] + names[:3] + [d.name for d in dense_dirs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dtype == torch.float32:
                return engine.generate(prompts, adapter=adapters, params=params)
            seqs = [engine.open(p[:1]) for p in prompts]
            return engine.score_many([(s, p[1:], a) for s, p, a in zip(seqs, prompts, adapters)])

    want = run(bank_lora_torch, dense_lora_torch)
    calls.update(bank=0, dense=0)
    got = run(bank_lora_triton, dense_lora_triton)
    assert calls["bank"] > 0 and calls["dense"] > 0
    if dtype == torch.float32:
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        lp = lambda outs: torch.tensor([[t.logprob for t in o.logprobs] for o in outs])  # noqa: E731
        torch.testing.assert_close(lp(got), lp(want), **FP32)
    else:
        torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in want]), **HALF)
