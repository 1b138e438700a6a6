"""serving.kernels against their float64 references: the Triton kernel (TRITON_INTERPRET=1 on
CPU, set by tests/conftest.py), the torch path and the dispatching entry points, over odd
shapes (hidden 2049, rank 1 and 64), empty and all-distinct batches and strided outputs."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import BankGroups, bank_lora, dense_lora, group_by_cluster, triton_available
from serving.kernels.bank_lora import (_interpreted, bank_lora_ref, bank_lora_routed, bank_lora_torch,
                                      bank_lora_triton, route_bank)
from serving.kernels.common import core_layout, use_padded
from serving.kernels.dense_lora import dense_lora_ref, dense_lora_torch, dense_lora_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# x, V, U ~ N(0, 1/d) scaling keeps every intermediate O(1): these are relative-size errors.
# bf16 rounds z, h and the sum into y (2^-8 each); fp32 only reorders sums.
TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
TRITON_RUNS = triton_available() and (DEVICE.type == "cuda" or _interpreted())
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton with CUDA or TRITON_INTERPRET=1")

BANK_IMPLS = [
    pytest.param(bank_lora_triton, id="triton", marks=needs_triton),
    pytest.param(bank_lora_torch, id="torch"),
    pytest.param(bank_lora, id="dispatch"),
]
DENSE_IMPLS = [
    pytest.param(dense_lora_triton, id="triton", marks=needs_triton),
    pytest.param(dense_lora_torch, id="torch"),
    pytest.param(dense_lora, id="dispatch"),
]


def make_ids(T: int, n: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """(T,) adapter ids: 'mixed' (some -1), 'all', 'none' (all -1), 'distinct', 'one', 'mostly-one'
    (one adapter on about 70% of the rows, the rest none: a verifier's scoring round)."""
    if pattern == "none":
        return torch.full((T,), -1)
    if pattern == "mostly-one":
        ids = torch.full((T,), n - 1)
        ids[torch.randperm(T, generator=gen)[: T * 3 // 10]] = -1
        return ids
    if pattern == "distinct":
        return torch.randperm(n, generator=gen)[:T]
    if pattern == "one":
        return torch.full((T,), n - 1)
    ids = torch.randint(0, n, (T,), generator=gen)
    if pattern == "mixed":
        ids[torch.rand(T, generator=gen) < 0.3] = -1
        ids[0] = -1
    return ids


def make_y(T: int, d_out: int, dtype, gen, view: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, base): y is base itself, or columns [d_out, 2*d_out) of a (T, 3*d_out) base."""
    base = torch.randn(T, 3 * d_out if view else d_out, generator=gen).to(DEVICE, dtype)
    return (base[:, d_out : 2 * d_out] if view else base), base


def check_update(fn, ref, args, y, base, ids, dtype, **kw) -> None:
    """Run fn in place on y; compare with ref on a copy; untouched entries must stay exact."""
    y0, base0 = y.clone(), base.clone()
    want = ref(*args, y.clone())
    got = fn(*args, y, **kw)
    assert got is y
    adapted = (ids >= 0).to(DEVICE)
    if adapted.any():  # non-vacuous: every adapted row really changes
        assert ((want - y0)[adapted].abs().amax(dim=1) > 0).all()
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(y[~adapted], y0[~adapted])
    if base.shape != y.shape:  # columns outside the view stay bit-identical
        outside = torch.ones(base.shape[1], dtype=torch.bool, device=DEVICE)
        outside[y.storage_offset() : y.storage_offset() + y.shape[1]] = False
        assert torch.equal(base[:, outside], base0[:, outside])


# ----------------------------------------------------------------------------- bank LoRA


def make_bank(T, d_in, d_out, r, K, n, diag, dtype, pattern, view=False, seed=0):
    """Random bank problem; adapter a lives in cluster a % K (shuffled by the ids)."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(K, d_in, r, generator=gen) / d_in**0.5
    U = torch.randn(K, d_out, r, generator=gen) / r**0.5
    S = torch.randn(n, r, generator=gen) if diag else torch.randn(n, r, r, generator=gen) / r**0.5
    x = torch.randn(T, d_in, generator=gen)
    core_ids = make_ids(T, n, pattern, gen)
    cluster_ids = torch.where(core_ids >= 0, core_ids % K, torch.full_like(core_ids, -1))
    if pattern == "sorted":  # every token adapted, already in cluster order: the no-gather path
        order = torch.argsort(cluster_ids, stable=True)
        core_ids, cluster_ids = core_ids[order], cluster_ids[order]
    y, base = make_y(T, d_out, dtype, gen, view)
    ids = (cluster_ids.int(), core_ids.int()) if seed % 2 else (cluster_ids, core_ids)
    args = tuple(t.to(DEVICE, dtype) for t in (x, V, S, U)) + tuple(t.to(DEVICE) for t in ids)
    return args, y, base, core_ids


BANK_CASES = {
    # id: (T, d_in, d_out, r, K, n, diag, dtype, pattern, view)
    "mixed-K3-full": (37, 64, 48, 8, 3, 10, False, torch.float32, "mixed", False),
    "mixed-K3-diag": (37, 64, 48, 8, 3, 10, True, torch.float32, "mixed", False),
    "K2-loop": (37, 40, 33, 5, 2, 7, False, torch.float32, "mixed", False),
    "r64-K1-sorted": (37, 96, 80, 64, 1, 5, False, torch.float32, "sorted", False),
    "sorted-K3": (21, 64, 48, 16, 3, 9, True, torch.float32, "sorted", False),
    "one-adapter-full": (19, 64, 48, 8, 3, 4, False, torch.float32, "one", False),
    "one-adapter-diag": (19, 64, 48, 8, 3, 4, True, torch.float32, "one", False),
    "distinct": (37, 64, 48, 8, 3, 50, False, torch.float32, "distinct", False),
    "none": (9, 64, 48, 8, 3, 10, False, torch.float32, "none", False),
    "y-view": (37, 64, 48, 8, 3, 10, False, torch.float32, "mixed", True),
    "T1-2049-r1": (1, 2049, 2049, 1, 1, 3, False, torch.float32, "all", False),
    "2049-in-r64-diag": (8, 2049, 40, 64, 3, 6, True, torch.float32, "mixed", False),
    "2049-out-r64-bf16": (8, 40, 2049, 64, 3, 6, False, torch.bfloat16, "mixed", True),
    "2049-bf16": (6, 2049, 2049, 16, 3, 6, False, torch.bfloat16, "mixed", False),
    "2049-r64-full": (5, 2049, 2049, 64, 3, 6, False, torch.float32, "all", False),
    "mixed-bf16": (37, 64, 48, 8, 3, 10, True, torch.bfloat16, "mixed", False),
    "mixed-fp16": (37, 64, 48, 8, 3, 10, False, torch.float16, "mixed", False),
}


@pytest.mark.parametrize("case", list(BANK_CASES), ids=list(BANK_CASES))
@pytest.mark.parametrize("fn", BANK_IMPLS)
def test_bank_lora_matches_reference(fn, case):
    *shape, dtype, pattern, view = BANK_CASES[case]
    seed = len(case)
    args, y, base, core_ids = make_bank(*shape, dtype, pattern, view, seed=seed)
    check_update(fn, bank_lora_ref, args, y, base, core_ids, dtype)


@pytest.mark.parametrize("fn", BANK_IMPLS)
def test_bank_groups_reused_across_layers(fn):
    """The engine builds groups once per forward and passes them to every layer."""
    args, y, base, core_ids = make_bank(37, 64, 48, 8, 3, 10, False, torch.float32, "mixed")
    groups = group_by_cluster(args[4], args[5])
    for layer in range(2):
        x, V, S, U, c, a = args
        layer_args = (x, V + layer, S, U, c, a)  # another layer's bases, same batch
        check_update(fn, bank_lora_ref, layer_args, y, base, core_ids, torch.float32, groups=groups)


def test_group_by_cluster_sorts_adapted_tokens_stably():
    cluster_ids = torch.tensor([2, -1, 0, 2, 0, 1, 7])
    core_ids = torch.tensor([5, -1, 3, 4, 3, 1, -1])
    g = group_by_cluster(cluster_ids, core_ids)
    assert isinstance(g, BankGroups)
    want = sorted((c, t) for t, (c, a) in enumerate(zip(cluster_ids.tolist(), core_ids.tolist())) if a >= 0)
    assert g.token_idx.tolist() == [t for _, t in want]
    assert g.core_idx.tolist() == [core_ids[t].item() for _, t in want]
    assert g.clusters == [0, 1, 2] and g.bounds == [(0, 2), (2, 3), (3, 5)]
    assert (g.identity, g.single_core, g.max_core, g.n_tokens) == (False, None, 5, 7)
    every = group_by_cluster(torch.tensor([0, 0, 1]), torch.tensor([2, 2, 2]))
    assert every.identity and every.single_core == 2


def bank_error_cases():
    args, y, _, _ = make_bank(5, 16, 12, 4, 2, 3, False, torch.float32, "all")
    x, V, S, U, c, a = args
    yield "x-1d", (x[0], V, S, U, c, a, y), ValueError, r"x: expected a 2-D tensor \(T, d_in\), got shape \(16,\)"
    yield "V-d_in", (x, V[:, :8].contiguous(), S, U, c, a, y), ValueError, r"V: expected \(K, 16, r\)"
    yield "U-rank", (x, V, S, U[..., :3].contiguous(), c, a, y), ValueError, r"U: expected \(2, 12, 4\)"
    yield "S-rank", (x, V, S[:, :3, :3].contiguous(), U, c, a, y), ValueError, r"S: expected \(n, 4, 4\) or \(n, 4\)"
    yield "S-dtype", (x, V, S.double(), U, c, a, y), TypeError, r"S: dtype torch.float64 differs from x's torch.float32"
    yield "x-dtype", (x.int(), V, S, U, c, a, y), TypeError, r"x: dtype torch.int32, accepted"
    yield "x-strided", (x.T.contiguous().T, V, S, U, c, a, y), ValueError, r"x: must be contiguous"
    yield "y-rows", (x, V, S, U, c, a, y[:3]), ValueError, r"y: expected 5 rows"
    yield "y-col-stride", (x, V, S, U, c, a, y.T.contiguous().T), ValueError, r"y: needs unit column stride"
    yield "ids-float", (x, V, S, U, c.float(), a, y), TypeError, r"cluster_ids: expected an int32/int64 tensor"
    yield "ids-len", (x, V, S, U, c, a[:4], y), ValueError, r"core_ids: expected shape \(5,\)"
    yield "cluster-range", (x, V, S, U, c + 2, a, y), ValueError, r"cluster_ids: .* accepted \[0, 2\)"
    yield "core-range", (x, V, S, U, c, a + 3, y), ValueError, r"core_ids: max id \d+, accepted \[0, 3\) or -1"


@pytest.mark.parametrize("fn", BANK_IMPLS)
@pytest.mark.parametrize("case", list(bank_error_cases()), ids=lambda c: c[0])
def test_bank_lora_rejects_bad_arguments(fn, case):
    _, call_args, exc, match = case
    with pytest.raises(exc, match=match):
        fn(*call_args)


def test_bank_lora_rejects_groups_of_another_batch():
    args, y, _, _ = make_bank(5, 16, 12, 4, 2, 3, False, torch.float32, "all")
    groups = group_by_cluster(args[4][:4], args[5][:4])
    with pytest.raises(ValueError, match=r"groups: built for 4 tokens, the batch has 5"):
        bank_lora(*args, y, groups=groups)


def bank_lora_routed_once(x, V, S, U, cluster_ids, core_ids, y):
    """What the adapter registry does once per batch (route, gather the cores in the route's row
    order with a zero core for pads), then one layer's call of the routed torch path."""
    route = route_bank(cluster_ids, core_ids, V.shape[0])
    cores = core_layout(torch.cat([S, torch.zeros_like(S[:1])])).contiguous()  # (n + 1, ...)
    rows = cores.index_select(0, torch.where(route.rows >= 0, route.rows, S.shape[0]))
    return bank_lora_routed(x, V, U.transpose(1, 2).contiguous(), rows, y, route)


ROUTED_CASES = {
    # id: (T, d_in, d_out, r, K, n, diag, dtype, pattern, view), layout the route must take
    "K16-every-cluster": ((64, 48, 40, 8, 16, 200, False, torch.float32, "all", False), "all-clusters"),
    "K16-some-absent": ((96, 48, 40, 8, 16, 10, False, torch.float32, "mixed", False), "all-clusters"),
    "K16-few-gathered": ((12, 48, 40, 8, 16, 5, False, torch.float32, "all", False), "gathered"),
    "K8-r24-zS-cores": ((64, 48, 40, 24, 8, 100, False, torch.float32, "all", False), "all-clusters"),
    "K8-r20-zS-cores": ((64, 48, 40, 20, 8, 100, False, torch.float32, "mixed", True), "all-clusters"),
    "K8-r19-Sz-cores": ((64, 48, 40, 19, 8, 100, False, torch.float32, "mixed", False), "all-clusters"),
    "K16-diag": ((64, 48, 40, 16, 16, 100, True, torch.float32, "mixed", False), "all-clusters"),
    "K16-sorted": ((96, 48, 40, 8, 16, 200, False, torch.float32, "sorted", False), "all-clusters"),
    "K2-sorted-loop": ((37, 40, 33, 5, 2, 7, False, torch.float32, "sorted", False), "loop"),
    "K16-one-adapter": ((19, 48, 40, 8, 16, 4, False, torch.float32, "one", False), "loop"),
    "K2-loop": ((37, 40, 33, 5, 2, 7, False, torch.float32, "mixed", False), "loop"),
    "K16-2049-bf16": ((32, 2049, 40, 24, 16, 60, False, torch.bfloat16, "mixed", True), "all-clusters"),
}


@pytest.mark.parametrize("case", list(ROUTED_CASES), ids=list(ROUTED_CASES))
def test_bank_lora_routed_matches_reference(case):
    """The engine's CPU path for banks of several clusters, over each of its layouts."""
    (*shape, dtype, pattern, view), layout = ROUTED_CASES[case]
    args, y, base, core_ids = make_bank(*shape, dtype, pattern, view, seed=len(case))
    route = route_bank(args[4], args[5], shape[4])
    took = "all-clusters" if route.padded_tok is not None else "gathered" if use_padded(route.groups) else "loop"
    assert took == layout
    check_update(bank_lora_routed_once, bank_lora_ref, args, y, base, core_ids, dtype)


def test_bank_lora_routed_reuses_one_route_across_layers():
    args, y, base, core_ids = make_bank(64, 48, 40, 8, 16, 200, False, torch.float32, "mixed")
    x, V, S, U, c, a = args
    route = route_bank(c, a, 16)
    rows = torch.where(route.rows >= 0, route.rows, S.shape[0])
    for layer in range(2):
        Vl, Sl = V + layer, S * (layer + 1)  # another layer's bases and cores, same batch
        cores = core_layout(torch.cat([Sl, torch.zeros_like(Sl[:1])])).contiguous().index_select(0, rows)
        want = bank_lora_ref(x, Vl, Sl, U, c, a, y.clone())
        torch.testing.assert_close(bank_lora_routed(x, Vl, U.transpose(1, 2).contiguous(), cores, y, route), want,
                                   **TOL[torch.float32])


# ----------------------------------------------------------------------------- dense LoRA


def make_dense(T, d_in, d_out, r, n, dtype, pattern, view=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(n, r, d_in, generator=gen) / d_in**0.5
    lora_B = torch.randn(n, d_out, r, generator=gen) / r**0.5
    x = torch.randn(T, d_in, generator=gen)
    ids = make_ids(T, n, pattern, gen)
    y, base = make_y(T, d_out, dtype, gen, view)
    args = tuple(t.to(DEVICE, dtype) for t in (x, lora_A, lora_B)) + ((ids.int() if seed % 2 else ids).to(DEVICE),)
    return args, y, base, ids


DENSE_CASES = {
    # id: (T, d_in, d_out, r, n, dtype, pattern, view)
    "mixed": (37, 64, 48, 8, 10, torch.float32, "mixed", False),
    "two-adapters": (37, 40, 33, 5, 2, torch.float32, "all", False),
    "distinct": (37, 64, 48, 8, 60, torch.float32, "distinct", False),
    "one-adapter": (19, 64, 48, 8, 4, torch.float32, "one", False),
    "none": (9, 64, 48, 8, 10, torch.float32, "none", False),
    "y-view": (37, 64, 48, 8, 10, torch.float32, "mixed", True),
    "T1-2049-r1": (1, 2049, 2049, 1, 3, torch.float32, "all", False),
    "2049-in-r64": (8, 2049, 40, 64, 12, torch.float32, "distinct", False),
    "2049-out-bf16": (8, 40, 2049, 16, 6, torch.bfloat16, "mixed", True),
    "mixed-bf16": (37, 64, 48, 8, 10, torch.bfloat16, "mixed", False),
    "mostly-one": (40, 64, 48, 8, 4, torch.float32, "mostly-one", False),
    "mostly-one-view": (40, 64, 48, 16, 4, torch.float32, "mostly-one", True),
    "mostly-one-bf16": (40, 64, 48, 8, 4, torch.bfloat16, "mostly-one", True),
}


@pytest.mark.parametrize("case", list(DENSE_CASES), ids=list(DENSE_CASES))
@pytest.mark.parametrize("fn", DENSE_IMPLS)
def test_dense_lora_matches_reference(fn, case):
    *shape, dtype, pattern, view = DENSE_CASES[case]
    args, y, base, ids = make_dense(*shape, dtype, pattern, view, seed=len(case))
    check_update(fn, dense_lora_ref, args, y, base, ids, dtype)


@pytest.mark.parametrize("case", ["mostly-one", "mostly-one-view", "mostly-one-bf16"])
def test_dense_lora_one_adapter_over_most_rows_takes_every_row(monkeypatch, case):
    """One adapter on most rows: every row goes through it with the others' z zeroed, no gather
    and no index_add_ (the per-group helpers are made to fail); the result is the reference's and
    the other rows stay bit-identical."""
    import serving.kernels.common as common

    def fail(*a, **k):
        raise AssertionError("took the gather / index_add_ path")

    monkeypatch.setattr(common, "_shrink", fail)
    monkeypatch.setattr(common, "_expand", fail)
    *shape, dtype, pattern, view = DENSE_CASES[case]
    args, y, base, ids = make_dense(*shape, dtype, pattern, view, seed=3)
    assert 0 < int((ids < 0).sum()) < len(ids) // 2
    check_update(dense_lora_torch, dense_lora_ref, args, y, base, ids, dtype)


def dense_error_cases():
    args, y, _, _ = make_dense(5, 16, 12, 4, 3, torch.float32, "all")
    x, A, B, ids = args
    yield "A-d_in", (x, A[..., :8].contiguous(), B, ids, y), ValueError, r"lora_A: expected \(n, r, 16\)"
    yield "B-shape", (x, A, B[:2], ids, y), ValueError, r"lora_B: expected \(3, 12, 4\)"
    yield "B-dtype", (x, A, B.half(), ids, y), TypeError, r"lora_B: dtype torch.float16 differs"
    yield "x-strided", (x.T.contiguous().T, A, B, ids, y), ValueError, r"x: must be contiguous"
    yield "ids-range", (x, A, B, ids + 3, y), ValueError, r"adapter_ids: .*accepted \[0, 3\)"


@pytest.mark.parametrize("fn", DENSE_IMPLS)
@pytest.mark.parametrize("case", list(dense_error_cases()), ids=lambda c: c[0])
def test_dense_lora_rejects_bad_arguments(fn, case):
    _, call_args, exc, match = case
    with pytest.raises(exc, match=match):
        fn(*call_args)
