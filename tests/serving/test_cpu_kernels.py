"""The CPU decode-attention kernel (`serving.cpu_kernels`) against SDPA on gathered keys with the
scheduler's own decode mask, its batch invariance, its refusals, and the engine using it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serving import Engine, SamplingParams, cpu_kernels
from serving.scheduler import _mask

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"no kernel: {cpu_kernels.why_unavailable}")

ROOT = Path(__file__).parents[2]


def case(b, h, hkv, hd, dtype, seed=0, slots_total=512, max_len=70):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(slots_total, hkv, hd, generator=g).to(dtype)
    vc = torch.randn(slots_total, hkv, hd, generator=g).to(dtype)
    lens = torch.randint(1, max_len, (b,), generator=g)
    lens[0] = 1  # a sequence of one key
    slots = torch.randint(0, slots_total, (b, int(lens.max())), generator=g)  # repeats allowed
    q = (torch.randn(b, h, hd, generator=g) * 3).to(dtype)  # peaked softmaxes too
    return q, kc, vc, slots, lens


def reference(q, kc, vc, slots, lens, window):
    """SDPA in float64 over the gathered keys, masked as the scheduler masks a decode group."""
    b, h, hd = q.shape
    hkv, L = kc.shape[1], slots.shape[1]
    kpos = torch.arange(L)[None]
    m = _mask(kpos, (lens - 1)[:, None], lens[:, None], window)[:, None, None, :]
    kg = kc.double().index_select(0, slots.reshape(-1)).view(b, L, hkv, hd).transpose(1, 2)
    vg = vc.double().index_select(0, slots.reshape(-1)).view(b, L, hkv, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.double().view(b, hkv, h // hkv, hd), kg, vg, attn_mask=m)
    return out.reshape(b, h * hd)


@pytest.mark.parametrize("hd", [16, 32, 64, 80, 128])
@pytest.mark.parametrize("h,hkv", [(4, 4), (9, 3), (12, 1), (20, 2)])  # G = 1, 3, 12 and 10 (no special case)
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_equals_sdpa_on_gathered_keys(hd, h, hkv, window):
    q, kc, vc, slots, lens = case(7, h, hkv, hd, torch.float32, seed=hd + h)
    want = reference(q, kc, vc, slots, lens, window)
    got = cpu_kernels.decode_attention(q, kc, vc, slots, lens, window)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    got = cpu_kernels.decode_attention(qb, kb, vb, slots, lens, window)
    want = reference(qb, kb, vb, slots, lens, window)  # the same rounded inputs, exact math
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=8e-3)  # one bfloat16 rounding


def test_strided_queries_and_a_custom_scale():
    q, kc, vc, slots, lens = case(5, 9, 3, 64, torch.float32, seed=3)
    wide = torch.randn(5, 12, 64)
    wide[:, :9] = q  # q as a view with a row stride, as the packed path hands it (qk[:, :H])
    got = cpu_kernels.decode_attention(wide[:, :9], kc, vc, slots, lens, scale=0.05)
    want = reference(q * (0.05 * 64 ** 0.5), kc, vc, slots, lens, None)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd,h,hkv", [(64, 9, 3), (32, 8, 4), (24, 4, 2)])
def test_a_sequence_gets_the_same_bits_alone_and_in_any_batch(dtype, hd, h, hkv):
    q, kc, vc, slots, lens = case(33, h, hkv, hd, dtype, seed=5)
    full = cpu_kernels.decode_attention(q, kc, vc, slots, lens)
    perm = torch.randperm(33, generator=torch.Generator().manual_seed(1))
    shuffled = cpu_kernels.decode_attention(q[perm], kc, vc, slots[perm], lens[perm])
    assert torch.equal(shuffled, full[perm])
    for i in (0, 7, 32):
        n = int(lens[i])
        alone = cpu_kernels.decode_attention(q[i:i + 1], kc, vc, slots[i:i + 1, :n], lens[i:i + 1])
        assert torch.equal(alone[0], full[i])


def test_bad_inputs_are_refused_not_read():
    q, kc, vc, slots, lens = case(3, 4, 2, 16, torch.float32)
    L = slots.shape[1]
    with pytest.raises(ValueError, match="lengths"):
        cpu_kernels.decode_attention(q, kc, vc, slots, torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="lengths"):
        cpu_kernels.decode_attention(q, kc, vc, slots, torch.tensor([1, L + 1, 2]))
    bad = slots.clone()
    bad[1, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="slots"):
        cpu_kernels.decode_attention(q, kc, vc, bad, torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError, match="float32 or all bfloat16"):
        cpu_kernels.decode_attention(q.bfloat16(), kc, vc, slots, lens)
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernels.decode_attention(q[:, :3], kc, vc, slots, lens)  # 3 query heads over 2 key heads
    assert cpu_kernels.decode_attention(q[:0], kc, vc, slots[:0], lens[:0]).shape == (0, 4 * 16)


def test_the_engine_decodes_through_the_kernel(tmp_path, monkeypatch):
    """The packed engine's decode steps and short prefill chunks call the kernel (every layer, every
    step), and give the reference path's tokens and log-probabilities in float32, sliding-window
    layers included."""
    from tests.helpers import make_tiny_model
    from tests.serving.test_model import VARIANTS

    arch, overrides = VARIANTS["mistral-window"]  # window 8: the long prompt's steps drop keys
    make_tiny_model(tmp_path, arch, seed=2, **overrides)
    calls = []
    real = cpu_kernels.decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a, **k: calls.append(a[4].numel()) or real(*a, **k))
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10], list(range(3, 30))]
    out = {}
    for name, packed in (("reference", False), ("packed", True)):
        e = Engine.from_pretrained(tmp_path, packed_weights=packed, kv_cache_tokens=512, block_size=4)
        if packed:
            assert e.model.packed.decode_kernel
        res = e.generate(prompts, params=params)
        out[name] = [o.token_ids for o in res], torch.tensor([[t.logprob for t in o.logprobs] for o in res])
    # the prefill's two short prompts (5 and 3 queries; the 27-token one takes SDPA) in every layer
    # but the last, which attends only the 3 rows whose logits are read (one call), then 5 decode
    # steps of 3 sequences, in every layer
    n = e.config.num_layers
    assert len(calls) == 2 * (n - 1) + 1 + 5 * n
    assert sorted(calls[:2]) == [3, 5] and calls[2 * (n - 1)] == 3 and set(calls[2:]) <= {3, 5}
    assert out["packed"][0] == out["reference"][0]
    torch.testing.assert_close(out["packed"][1], out["reference"][1], atol=2e-5, rtol=1e-4)


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **env})


def test_it_builds_into_its_cache_and_can_be_switched_off(tmp_path):
    code = ("from serving import cpu_kernels as k; print(k.available(), k.why_unavailable); "
            "print(sorted(p.name for p in k.cache_dir().glob('*.so')))")
    r = _python(code, {"KILOLORA_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    first, files = r.stdout.splitlines()
    assert first == "True None" and files.startswith("['cpu_kernels-") and list((tmp_path / "kernels").glob("*.so"))
    r = _python(code, {"KILOLORA_CACHE_DIR": str(tmp_path), "KILOLORA_CPU_KERNELS": "0"})
    assert r.returncode == 0 and r.stdout.startswith("False KILOLORA_CPU_KERNELS=0"), r.stdout + r.stderr
    env = {"KILOLORA_CACHE_DIR": str(tmp_path / "other"), "PATH": str(tmp_path / "empty"), "CXX": ""}
    r = _python(code, env)  # no compiler on PATH: unavailable, and one warning says so
    assert r.returncode == 0 and r.stdout.startswith("False no C++ compiler"), r.stdout + r.stderr
    assert "decode attention uses SDPA" in r.stderr


@pytest.mark.skipif(os.environ.get("KILOLORA_CPU_MARCH") is not None, reason="this run is the other build")
@pytest.mark.skipif(not {"avx512f", "avx2"} <= set(cpu_kernels._cpu_id().split()),
                    reason="needs an AVX-512 CPU, whose native build skips the AVX2 code")
def test_the_avx2_build_passes_these_tests_too(tmp_path):
    """A laptop's kernels (AVX2: 8-lane vectors, the generic decode attention, 16-column expand
    tiles): this file's tests again in a subprocess on a `-march=haswell` build of its own."""
    env = {"KILOLORA_CACHE_DIR": str(tmp_path), "KILOLORA_CPU_MARCH": "haswell"}
    r = _python("from serving import cpu_kernels as k; print(k.vector_lanes())", env)
    assert r.returncode == 0 and r.stdout.split() == ["8"], r.stdout + r.stderr
    assert cpu_kernels.vector_lanes() == 16  # this process: the native AVX-512 build
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env={**os.environ, **env})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_without_the_kernel_the_engine_keeps_sdpa(tmp_path, monkeypatch):
    from tests.helpers import make_tiny_model

    make_tiny_model(tmp_path, seed=8)
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=0, ignore_eos=True)
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    with_kernel = Engine.from_pretrained(tmp_path, kv_cache_tokens=256, block_size=4).generate(prompts, params=params)
    monkeypatch.setattr(cpu_kernels, "_load", lambda: None)
    e = Engine.from_pretrained(tmp_path, kv_cache_tokens=256, block_size=4)
    assert e.model.packed is not None and not e.model.packed.decode_kernel
    without = e.generate(prompts, params=params)
    assert [o.token_ids for o in without] == [o.token_ids for o in with_kernel]
    for a, b in zip(without, with_kernel):
        torch.testing.assert_close(torch.tensor([t.logprob for t in a.logprobs]),
                                   torch.tensor([t.logprob for t in b.logprobs]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 576), (16, 256), (64, 70), (3, 5000)])
def test_rms_norm_is_transformers_rmsnorm(dtype, n, d):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(n + d)
    wide = (torch.randn(n, d + 7, generator=g) * 4).to(dtype)
    x = wide[:, 3:3 + d]  # strided rows
    norm = LlamaRMSNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_((torch.rand(d, generator=g) + 0.5).to(dtype))
        want = norm(x)
    got = cpu_kernels.rms_norm(x, norm.weight.detach(), 1e-5)
    assert got.dtype == dtype and got.shape == (n, d)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=0, rtol=8e-3)  # <= 1 bf16 ulp
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(cpu_kernels.rms_norm(x[1:2].contiguous(), norm.weight.detach(), 1e-5)[0], got[1]) if n > 1 else True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,i", [(1, 1536), (64, 768), (5, 33)])
def test_silu_mul_is_torchs(dtype, n, i):
    g = torch.Generator().manual_seed(i)
    gu = (torch.randn(n, 2 * i, generator=g) * 6).to(dtype)
    gu[0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # saturating and zero inputs
    want = F.silu(gu[:, :i]) * gu[:, i:]
    got = cpu_kernels.silu_mul(gu)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=8e-3)
    torch.testing.assert_close(got, want, **tol)


def test_rms_norm_and_silu_mul_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="weight must be"):
        cpu_kernels.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="2-D float32 or bfloat16"):
        cpu_kernels.rms_norm(torch.randn(2, 8).half(), torch.ones(8).half(), 1e-6)
    with pytest.raises(ValueError, match="odd"):
        cpu_kernels.silu_mul(torch.randn(2, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,hkv,hd", [(1, 9, 3, 64), (16, 9, 3, 64), (70, 4, 2, 32), (5, 2, 1, 6)])
def test_rope_kv_is_the_torch_ops_it_replaces(dtype, n, h, hkv, hd):
    """q and k rotated and k, v written to their slots: torch's qk * cos, addcmul with the rotated
    halves and index_copy_ (the packed path's ops before it), bit for bit in bfloat16, to float32
    rounding in float32; rows may be strided (a GEMM output with extra columns), other slots stay."""
    g = torch.Generator().manual_seed(n * 7 + hd)
    width = (h + 2 * hkv) * hd
    qkv = (torch.randn(n, width + 5, generator=g) * 4).to(dtype)[:, :width]  # strided rows
    ang = torch.rand(n, hd // 2, generator=g) * 50
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([-ang.sin(), ang.sin()], -1).to(dtype)
    S = 3 * n + 4
    slots = torch.randperm(S, generator=g)[:n]
    kc, vc = torch.randn(S, hkv, hd, generator=g).to(dtype), torch.randn(S, hkv, hd, generator=g).to(dtype)
    k_ref, v_ref = kc.clone(), vc.clone()
    qk = qkv[:, :(h + hkv) * hd].unflatten(-1, (h + hkv, hd))
    x1, x2 = qk.chunk(2, dim=-1)
    rot = torch.addcmul(qk * cos[:, None], torch.cat([x2, x1], dim=-1), sin[:, None])
    k_ref.index_copy_(0, slots, rot[:, h:])
    v_ref.index_copy_(0, slots, qkv[:, (h + hkv) * hd:].unflatten(-1, (hkv, hd)))
    q = cpu_kernels.rope_kv(qkv, cos, sin, h, hkv, kc, vc, slots)
    assert q.shape == (n, h, hd)
    if dtype == torch.bfloat16:
        assert torch.equal(q, rot[:, :h]) and torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
    else:
        torch.testing.assert_close(q, rot[:, :h], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(kc, k_ref, atol=1e-5, rtol=1e-6)
        assert torch.equal(vc, v_ref)
    # against the float64 math: the rotation itself, not only the same ops
    xd = qkv[:, :(h + hkv) * hd].double().unflatten(-1, (h + hkv, hd))
    a, b = xd[..., :hd // 2], xd[..., hd // 2:]
    c, s = ang.double().cos()[:, None], ang.double().sin()[:, None]
    exact = torch.cat([a * c - b * s, b * c + a * s], -1)
    tol = 0.15 if dtype == torch.bfloat16 else 1e-4
    assert (q.double() - exact[:, :h]).abs().max() < tol * (1 + exact.abs().max())


def test_rope_kv_refuses_what_it_cannot_write():
    qkv = torch.randn(2, (4 + 2 * 2) * 8)
    cos = sin = torch.ones(2, 8)
    kc, vc = torch.zeros(6, 2, 8), torch.zeros(6, 2, 8)
    with pytest.raises(ValueError, match="slots must be in 0..5"):
        cpu_kernels.rope_kv(qkv, cos, sin, 4, 2, kc, vc, torch.tensor([1, 6]))
    assert not kc[0].any() and not kc[2:].any() and not vc[2:].any()  # only the good row's slot 1 written
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.rope_kv(qkv, cos, sin, 4, 1, kc, vc, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="share one dtype"):
        cpu_kernels.rope_kv(qkv, cos.bfloat16(), sin, 4, 2, kc, vc, torch.tensor([1, 2]))


needs_bf16_gemm = pytest.mark.skipif(not cpu_kernels.has_gemm_bf16(), reason="no AVX512-BF16 on this CPU / build")


@needs_bf16_gemm
@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (5, 70, 32), (16, 963, 576), (17, 40, 1536), (40, 33, 64)])
def test_bf16_gemm_is_the_float64_product_rounded_once(m, n, k):
    """x W^T + bias + residual against float64 on the same bfloat16 inputs: within one bfloat16
    rounding of the exact value (a wrong pair order, column block or row stride is off by O(1));
    x and the residual as strided rows, N not a multiple of 16, M past the 16-row tile."""
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k + 6, generator=g).bfloat16()[:, 3:3 + k]
    bias = torch.randn(n, generator=g).bfloat16()
    res = torch.randn(m, n + 2, generator=g).bfloat16()[:, :n]
    lin = cpu_kernels.Bf16Linear(w)
    exact = x.double() @ w.double().T + bias.double() + res.double()
    got = lin(x, bias, res)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    err = (got.double() - exact).abs()
    assert (err <= exact.abs() * 2 ** -8 + 1e-3 * k ** 0.5 * 2 ** -8).all(), err.max()
    plain = lin(x)
    torch.testing.assert_close(plain.double(), x.double() @ w.double().T, rtol=2 ** -8, atol=1e-2)


@needs_bf16_gemm
def test_bf16_gemm_gives_a_row_the_same_bits_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 576, generator=g).bfloat16()
    x = torch.randn(37, 576, generator=g).bfloat16()
    lin = cpu_kernels.Bf16Linear(w)
    full = lin(x)
    for i in (0, 15, 16, 36):
        assert torch.equal(lin(x[i:i + 1])[0], full[i])
    assert torch.equal(lin(x[16:32]), full[16:32])


@needs_bf16_gemm
def test_bf16_gemm_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="even width"):
        cpu_kernels.Bf16Linear(torch.randn(4, 5).bfloat16())
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_kernels.Bf16Linear(torch.randn(4, 6))
    lin = cpu_kernels.Bf16Linear(torch.randn(4, 6).bfloat16())
    with pytest.raises(ValueError, match="x must be"):
        lin(torch.randn(2, 6))
    with pytest.raises(ValueError, match="residual must be"):
        lin(torch.randn(2, 6).bfloat16(), residual=torch.randn(2, 3).bfloat16())
    with pytest.raises(ValueError, match="bias must be"):
        lin(torch.randn(2, 6).bfloat16(), bias=torch.randn(3).bfloat16())
    assert lin(torch.randn(0, 6).bfloat16()).shape == (0, 4)


@needs_bf16_gemm
def test_a_bf16_engine_decodes_through_its_own_gemm_and_stays_near_onednns(tmp_path, monkeypatch):
    """At decode's few rows a bfloat16 engine's GEMMs (every projection and the head) run on
    `Bf16Linear`; its greedy tokens and log-probabilities stay within bfloat16's rounding of the
    oneDNN path's (`KILOLORA_BF16_GEMM=0`)."""
    from tests.helpers import make_tiny_model

    make_tiny_model(tmp_path, seed=8)
    calls = []
    orig = cpu_kernels.Bf16Linear.__call__
    monkeypatch.setattr(cpu_kernels.Bf16Linear, "__call__", lambda self, *a: calls.append(self.n) or orig(self, *a))
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    prompts = [[5, 9, 3, 17], [8, 2], [30, 31, 4, 4, 9]]

    def run(env):
        monkeypatch.setenv("KILOLORA_BF16_GEMM", env)
        e = Engine.from_pretrained(tmp_path, dtype=torch.bfloat16, kv_cache_tokens=256, block_size=4)
        outs = e.generate(prompts, params=params)
        return [o.token_ids for o in outs], torch.tensor([[t.logprob for t in o.logprobs] for o in outs])

    tok_own, lp_own = run("1")
    n_layers = 2
    assert len(calls) == 6 * (4 * n_layers + 1)  # 6 forwards (11 prompt rows, then 3): 4 groups a layer and the head
    calls.clear()
    tok_dnn, lp_dnn = run("0")
    assert not calls
    assert [t[0] for t in tok_own] == [t[0] for t in tok_dnn]
    assert (lp_own[:, 0] - lp_dnn[:, 0]).abs().max() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_expand_rounds_as_torch_and_keeps_nan_and_inf(dtype):
    """y's update rounds once to y's dtype as torch's `y.float() + d` then `.to(dtype)` does, in
    the full 64-column tiles and in a block's narrower tail (d exactly representable, so the sums
    are exact and any difference is the rounding); NaN stays NaN and an infinity stays itself."""
    n, R, D = 5, 4, 64 + 24
    ut = torch.zeros(R, D)
    ut[0] = 2.0 ** -9  # h = z: each entry adds z_0 / 512
    cores = torch.zeros(n, R)
    cores[:, 0] = 1.0
    g = torch.Generator().manual_seed(0)
    y = torch.randn(n, D, generator=g).to(dtype)
    y[1, 3], y[1, 70], y[2, 5], y[2, 80] = float("nan"), float("nan"), float("inf"), -float("inf")
    z = torch.zeros(n, R, dtype=dtype)
    z[:, 0] = torch.tensor([1.0, 3.0, -5.0, 0.75, 7.0])
    want = (y.float() + z.float()[:, :1] * 2.0 ** -9).to(dtype)  # the exact sums, rounded once
    assert (torch.nan_to_num(want) != torch.nan_to_num(y)).sum() > D // 2
    cpu_kernels.bank_expand(z, cores, False, ut, y, cpu_kernels.bank_blocks(None, R, D))
    assert torch.equal(y.isnan(), want.isnan()) and y.isnan().sum() == 2
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["full-small", "full-zs", "diag"])
@pytest.mark.parametrize("n", [8, 9, 23])
def test_bank_expand_is_the_folded_banks_torch_math(dtype, kind, n):
    """y += (S_n z_n) Uᵀ per module block, against apply_cores + a matmul (lora_batch's torch path);
    a row with the zero core (a base token) keeps its bits, and a row's bits are the same computed
    alone. The kernel tiles 4 rows x 64 columns (16 on AVX2): n - 1 live rows leave 3, 0 and 2 rows
    over, and the modules' widths full tiles and a narrower last one."""
    from serving.kernels.common import CORE_ZS_MIN_RANK, apply_cores, core_layout

    g = torch.Generator().manual_seed(len(kind) + n)
    r = 4 if kind == "full-small" else 16  # R = 12 (S @ z) or 48 (z @ Sᵀ)
    outs = [136, 24, 72]  # a q|k|v-like group: three modules, each of rank r
    R, D = 3 * r, sum(outs)
    ut = torch.zeros(R, D)
    blocks, off = [], 0
    for j, o in enumerate(outs):
        ut[j * r:(j + 1) * r, off:off + o] = torch.randn(r, o, generator=g)
        blocks.append((slice(j * r, (j + 1) * r), slice(off, off + o)))
        off += o
    if kind == "diag":
        cores = torch.randn(n, R, generator=g)
    else:
        S = torch.zeros(n, R, R)
        for j in range(3):
            S[:, j * r:(j + 1) * r, j * r:(j + 1) * r] = torch.randn(n, r, r, generator=g)
        cores = core_layout(S).contiguous()
    cores[4] = 0  # a base token
    zs = kind == "full-zs"
    assert zs == (cores.dim() == 3 and R >= CORE_ZS_MIN_RANK)
    wide = torch.randn(n, D + R + 3, generator=g).to(dtype)  # y and z = x V side by side, as the GEMM leaves them
    y, z = wide[:, :D], wide[:, D:D + R]
    want = y.float() + apply_cores(z.float(), cores) @ ut
    before = y.clone()
    cpu_kernels.bank_expand(z, cores, zs, ut, y, cpu_kernels.bank_blocks(blocks, R, D))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=8e-3)
    torch.testing.assert_close(y.float(), want.to(dtype).float(), **tol)
    assert torch.equal(y[4], before[4]) and not torch.equal(y[3], before[3])
    expand = cpu_kernels.BankExpand(cores[n - 1:], zs, ut, cpu_kernels.bank_blocks(blocks, R, D))
    alone = before[n - 1:].clone()
    expand(z[n - 1:], alone)
    assert torch.equal(alone[0], y[n - 1])
    with pytest.raises(ValueError, match="outside"):
        cpu_kernels.bank_expand(z, cores, zs, ut, y, torch.tensor([[0, R + 1, 0, D]], dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit 1 rows"):
        expand(z, y)  # the rows its cores were made for, not the batch's
    with pytest.raises(ValueError, match="do not fit"):
        expand(z[n - 1:], alone.float() if dtype == torch.bfloat16 else alone.bfloat16())


HEAP_PROBE = """
import ctypes, resource, tempfile
from serving import Engine, cpu_kernels
from tests.helpers import make_tiny_model
with tempfile.TemporaryDirectory() as d:
    make_tiny_model(d)
    Engine.from_pretrained(d, kv_cache_tokens=64)  # a CPU engine tunes the heap, once per process
print(cpu_kernels._heap, end=" ")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 30 << 20  # one activation of a large prefill chunk
for i in range(3):
    f = faults(); p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
    print(faults() - f, end=" ")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_cpu_engine_keeps_freed_activations_warm_in_the_heap():
    """Once an engine tuned the heap, the second 30 MiB block reuses the first one's pages (no page
    faults); with the tuning off, or under the user's own glibc settings, glibc maps the first
    block and hands it back, and the second one faults on every page again."""
    pages = (30 << 20) // 4096
    runs = {}
    for name, env in (("tuned", {}), ("off", {"KILOLORA_RETAIN_HEAP": "0"}),
                      ("user's", {"MALLOC_TRIM_THRESHOLD_": "131072"})):
        r = _python(HEAP_PROBE, env)
        assert r.returncode == 0, r.stderr
        tuned, *counts = r.stdout.split()
        runs[name] = tuned, [int(c) for c in counts]
    tuned, counts = runs["tuned"]
    assert tuned == "True" and counts[0] > pages // 2 and max(counts[1:]) < pages // 20, runs
    for name in ("off", "user's"):
        tuned, counts = runs[name]
        assert tuned == "False" and counts[1] > pages // 2, runs
