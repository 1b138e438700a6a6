"""The packed path (oneDNN-packed weights, fused residual adds, fewer ops per layer) against the
reference path and transformers / peft, and the decode-side shortcuts that came with it (grouped
decode attention, the vectorised greedy argmax)."""

from __future__ import annotations

import pytest
import torch

from compression.bank import Bank, BankEntry
from compression.peft_io import TargetInfo
from serving import Engine, SamplingParams
import serving.model as model_mod
from serving.model import FUSED_GROUPS, PackedWeights, load_model
from serving.sampling import argmax
from tests.helpers import hf_teacher_forced, make_peft_adapter, make_tiny_model, teacher_forced
from tests.serving.test_model import VARIANTS

pytestmark = pytest.mark.skipif(not PackedWeights.supported(torch.float32, torch.device("cpu")),
                                reason="torch without oneDNN: the packed path is off")

ROWS = PackedWeights.FP32_ROWS[0] + 2
"""decode batches this large run float32 GEMMs on the packed weights (smaller ones on the plain)"""


@pytest.fixture(autouse=True)
def pack_tiny_models(monkeypatch):
    """float32 packs only from hidden 512 by default (below, MKL wins): these tiny models pack."""
    monkeypatch.setattr(PackedWeights, "FP32_MIN_HIDDEN", 0)
    monkeypatch.setattr(PackedWeights, "FP32_AMD_MIN_WEIGHT", 0)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def pair(path, **kw) -> dict[str, Engine]:
    return {"reference": Engine.from_pretrained(path, packed_weights=False, kv_cache_tokens=1024, block_size=4, **kw),
            "packed": Engine.from_pretrained(path, kv_cache_tokens=1024, block_size=4, **kw)}


def decode(engine: Engine, ps: list[list[int]], adapters=None, n: int = 8):
    params = SamplingParams(max_tokens=n, temperature=0, logprobs=0, ignore_eos=True)
    outs = engine.generate(ps, adapter=adapters, params=params)
    return [o.token_ids for o in outs], torch.tensor([[t.logprob for t in o.logprobs] for o in outs])


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return path, make_tiny_model(path, arch, seed=3, **overrides)


def test_engine_switches_paths_and_refuses_what_it_cannot_pack(tmp_path):
    make_tiny_model(tmp_path, seed=1)
    e = pair(tmp_path)
    assert e["reference"].model.packed is None and e["packed"].model.packed.packs
    half = load_model(tmp_path, dtype=torch.float16)
    assert half.use_packed() is False and half.packed is None  # auto: not supported, so off
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        half.use_packed(True)


def test_packed_decode_equals_the_reference_and_transformers(variant):
    """Every variant (biases, tied head, MHA, sliding window, Qwen2) decoding a batch of ROWS on the
    packed GEMMs and one sequence on the plain ones: transformers' greedy tokens, the reference
    path's log-probabilities."""
    path, hf = variant
    e = pair(path)
    assert e["packed"].model.packed.packs
    ps = prompts(ROWS)
    (tok_r, lp_r), (tok_p, lp_p) = decode(e["reference"], ps), decode(e["packed"], ps)
    assert tok_p == tok_r
    torch.testing.assert_close(lp_p, lp_r, atol=2e-5, rtol=1e-4)
    for p, t in zip(ps[:3], tok_p):
        want = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist()
        assert t == want
    ids = ps[0] + tok_p[0]  # teacher-forced: the prefill path, every position
    torch.testing.assert_close(teacher_forced(e["packed"], ids, None), hf_teacher_forced(hf, ids), atol=2e-5, rtol=1e-4)
    alone = decode(e["packed"], ps[:1])
    assert alone[0] == tok_p[:1]
    torch.testing.assert_close(alone[1], lp_p[:1], atol=2e-5, rtol=1e-4)


def test_packed_bfloat16_is_within_bfloat16s_tolerance(tmp_path):
    hf = make_tiny_model(tmp_path, seed=5)
    e = pair(tmp_path, dtype=torch.bfloat16)
    ids = list(range(3, 40))
    want = hf_teacher_forced(hf.to(torch.bfloat16), ids)
    ref, got = teacher_forced(e["reference"], ids, None), teacher_forced(e["packed"], ids, None)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)
    ps = prompts(ROWS, seed=2)
    (_, lp_r), (_, lp_p) = decode(e["reference"], ps), decode(e["packed"], ps)
    assert (lp_p - lp_r).abs().max() < 0.1


def _bank(engine: Engine, n: int, rank: int = 4) -> Bank:
    """A one-cluster JD-Full bank over every projection: on CPU the registry folds its V into the
    base weights (`add_extra_outputs`), so the packed path runs the extra rows."""
    c, g = engine.config, torch.Generator().manual_seed(7)
    targets = []
    for layer in range(c.num_layers):
        for group in FUSED_GROUPS.values():
            for m in group:
                part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                d_in, d_out = c.module_shape(m)
                targets.append(TargetInfo(f"base_model.model.model.layers.{layer}.{part}.{m}", d_in, d_out))
    U = {t.name: torch.linalg.qr(torch.randn(1, t.out_features, rank, generator=g))[0] for t in targets}
    V = {t.name: torch.linalg.qr(torch.randn(1, t.in_features, rank, generator=g))[0] for t in targets}
    cores = {t.name: torch.randn(n, rank, rank, generator=g) for t in targets}
    entries = [BankEntry(name=f"e{i}", index=i, cluster=0, targets=list(U), r=rank, lora_alpha=rank) for i in range(n)]
    return Bank(method="jd-full", rank=rank, targets=targets, U=U, V=V, cores=cores, entries=entries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_adapters_equal_the_reference_and_leave_base_rows_untouched(tmp_path, dtype):
    """Dense PEFT adapters and a folded bank, mixed with base rows in one batch: the packed path
    gives the reference path's tokens and log-probabilities (in bfloat16 within its rounding: the
    folded bank's per-token math runs in float32 on CPU), and a base row's the same bits as in a
    batch with no adapter at all."""
    make_tiny_model(tmp_path / "base", seed=4)
    make_peft_adapter(tmp_path / "base", tmp_path / "lora", seed=9,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    e = pair(tmp_path / "base", adapters={"lora": tmp_path / "lora"}, dtype=dtype)
    for engine in e.values():
        engine.load_bank(_bank(engine, 3), prefix="b/")
        assert any(lw.extra for lw in engine.model.layers)
    ps = prompts(ROWS + 2, seed=3)
    adapters = [None, "lora", "b/e0", "b/e1", "b/e2", None] * 2
    (tok_r, lp_r), (tok_p, lp_p) = decode(e["reference"], ps, adapters), decode(e["packed"], ps, adapters)
    if dtype == torch.float32:
        assert tok_p == tok_r
        torch.testing.assert_close(lp_p, lp_r, atol=2e-5, rtol=1e-4)
    else:  # rounding may flip a near tie and the sequences part: the first step is compared
        assert [t[0] for t in tok_p] == [t[0] for t in tok_r]
        assert (lp_p[:, 0] - lp_r[:, 0]).abs().max() < 0.1
    # on a twin engine: on this one the prompts' blocks are cached now, and their last tokens would
    # be computed as decode rows (the decode-attention kernel), not in the prefill (SDPA)
    twin = Engine.from_pretrained(tmp_path / "base", adapters={"lora": tmp_path / "lora"}, dtype=dtype,
                                  kv_cache_tokens=1024, block_size=4)
    twin.load_bank(_bank(twin, 3), prefix="b/")
    base_only = decode(twin, ps, [None] * len(ps))
    assert len({tuple(t) for t in tok_p}) > len({tuple(t) for t in base_only[0][:2]})  # the adapters change tokens
    rows = [i for i, a in enumerate(adapters) if a is None]
    assert [tok_p[i] for i in rows] == [base_only[0][i] for i in rows]
    assert torch.equal(lp_p[rows], base_only[1][rows])


def test_repacking_after_extra_outputs_keeps_the_model(tmp_path):
    """Extra rows appended after packing are repacked: the hook gets x W_extra^T, the model's own
    outputs stay, on the packed GEMMs and the plain ones."""
    from serving.model import AttnGroup, ForwardBatch, KVCache

    make_tiny_model(tmp_path, seed=6)
    model = load_model(tmp_path)
    model.use_packed(True)
    torch.manual_seed(0)
    w = torch.randn(3, 64)
    n = ROWS
    batch = ForwardBatch(torch.arange(3, 3 + n), torch.zeros(n, dtype=torch.long), torch.arange(n),
                         [AttnGroup(torch.arange(n)[:, None], torch.arange(n)[:, None],
                                    {None: torch.ones(n, 1, 1, 1, dtype=torch.bool)}, True)])
    cache = KVCache(model.config, 8, 4, model.dtype, model.device)
    before = model.forward(batch, cache)
    model.add_extra_outputs(1, "down", w)
    seen = {}

    def hook(layer, group, x, y, extra):
        if (layer, group) == (1, "down"):
            seen["x"], seen["extra"] = x.clone(), extra.clone()
        else:
            assert extra is None

    torch.testing.assert_close(model.forward(batch, cache, hook), before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(seen["extra"], seen["x"] @ w.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.forward(batch, cache), before, atol=0, rtol=0)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extra_outputs_on_every_group_keep_the_model_and_hand_each_hook_its_own(tmp_path, dtype):
    """Extra rows on every group of every layer (a folded bank's layout): gate|up's pack is padded
    to a multiple of `PAD_TO` columns (its base width, 128, is one), o and down sum the residual in
    their GEMMs through an [h | 0] operand that the previous o / down output is, its extra columns
    zeroed after the hook read them. The model's outputs stay (float32: to GEMM rounding; bfloat16:
    the same bits, the residual added in the GEMM as without extra rows), and every hook gets
    exactly x W_extra^T: columns left unzeroed would add the last group's extra outputs to the
    next one's."""
    from serving.model import AttnGroup, ForwardBatch, KVCache

    make_tiny_model(tmp_path, seed=6)
    model = load_model(tmp_path, dtype=dtype)
    model.use_packed(True)
    n = ROWS
    batch = ForwardBatch(torch.arange(3, 3 + n), torch.zeros(n, dtype=torch.long), torch.arange(n),
                         [AttnGroup(torch.arange(n)[:, None], torch.arange(n)[:, None],
                                    {None: torch.ones(n, 1, 1, 1, dtype=torch.bool)}, True)])
    cache = KVCache(model.config, 8, 4, model.dtype, model.device)
    before = model.forward(batch, cache)
    g = torch.Generator().manual_seed(1)
    extra = {}
    for layer in range(len(model.layers)):
        for group in FUSED_GROUPS:
            d_in = getattr(model.layers[layer], {"qkv": "wqkv", "o": "wo", "gate_up": "w_gate_up",
                                                 "down": "w_down"}[group]).shape[1]
            extra[(layer, group)] = w = torch.randn(3, d_in, generator=g).to(dtype)
            model.add_extra_outputs(layer, group, w)
    packed = model.packed
    wp, _, w, out, _ = packed._groups[(0, "gate_up")]
    assert out == 2 * model.config.intermediate_size and wp.size(0) == 256 and w.shape[0] == out + 3
    assert packed._groups[(0, "o")][0].size(0) == model.config.hidden_size + 3  # 32 + 3: no pad
    seen = []

    def hook(layer, group, x, y, e):
        assert e.shape == (n, 3)
        if group == "gate_up":
            assert y.shape[1] == out
        ref = (x.float() @ extra[(layer, group)].float().T).to(dtype)
        torch.testing.assert_close(e, ref, atol=1e-5 if dtype == torch.float32 else 0.05, rtol=0.02)
        seen.append((layer, group))

    after = model.forward(batch, cache, hook)
    assert len(seen) == 4 * len(model.layers)
    if dtype == torch.float32:
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("vocab", [49152, 5000, 1024, 700])
def test_argmax_is_torchs_first_maximum(vocab):
    g = torch.Generator().manual_seed(vocab)
    for x in (torch.randn(16, vocab, generator=g), torch.randint(0, 3, (5, vocab), generator=g).float(),
              torch.zeros(3, vocab)):
        x[0, : vocab // 2] = -torch.inf  # a masked prefix; ties everywhere in the integer rows
        x[-1, -1] = 1e9  # the maximum in the (shorter) tail block
        assert torch.equal(argmax(x), x.argmax(-1))
    assert torch.equal(argmax(x[:, ::2]), x[:, ::2].argmax(-1))  # not contiguous: torch's own


def test_small_float32_models_keep_mkl_and_still_fuse(tmp_path, monkeypatch):
    """Below FP32_MIN_HIDDEN nothing is packed (no second copy of the weights); the path's other
    fusions (residual via addmm, RMSNorm, RoPE) still give the reference path's results."""
    monkeypatch.setattr(PackedWeights, "FP32_MIN_HIDDEN", 512)
    monkeypatch.setattr(model_mod, "MKL_SLOW", False)  # MKL's fast path (Intel): the hidden-size rule
    make_tiny_model(tmp_path, seed=8)
    e = pair(tmp_path)
    assert e["packed"].model.packed is not None and not e["packed"].model.packed.packs
    ps = prompts(ROWS, seed=5)
    (tok_r, lp_r), (tok_p, lp_p) = decode(e["reference"], ps), decode(e["packed"], ps)
    assert tok_p == tok_r
    torch.testing.assert_close(lp_p, lp_r, atol=2e-5, rtol=1e-4)


def test_where_mkl_is_slow_big_float32_weights_pack_at_every_row_count(tmp_path, monkeypatch):
    """The AMD rule (`MKL_SLOW`): weights from FP32_AMD_MIN_WEIGHT elements up are packed and run
    packed at any row count (1 here), smaller ones stay on MKL; the results are the reference's."""
    monkeypatch.setattr(model_mod, "MKL_SLOW", True)
    hf = make_tiny_model(tmp_path, seed=8)
    c = hf.config
    gate_up = 2 * c.intermediate_size * c.hidden_size
    monkeypatch.setattr(PackedWeights, "FP32_AMD_MIN_WEIGHT", gate_up)  # gate_up packs, o does not
    e = pair(tmp_path)
    pw = e["packed"].model.packed
    assert pw.rows[0] == 1 and pw._groups[(0, "gate_up")][0] is not None and pw._groups[(0, "o")][0] is None
    for n in (1, ROWS):
        ps = prompts(n, seed=6)
        (tok_r, lp_r), (tok_p, lp_p) = decode(e["reference"], ps), decode(e["packed"], ps)
        assert tok_p == tok_r
        torch.testing.assert_close(lp_p, lp_r, atol=2e-5, rtol=1e-4)
