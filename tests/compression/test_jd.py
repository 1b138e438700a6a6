"""JD-Full, JD-Diag and per-adapter SVD against brute-force dense implementations."""

from __future__ import annotations

import pytest
import torch

from compression import jd, linalg
from compression.synthetic import PlantedSpec, planted_factors


def stacked(spec: PlantedSpec, target_index: int = 0):
    """A (n, r, d_in), B (n, d_out, r) of one target of a planted collection."""
    As, Bs, groups = planted_factors(spec)
    target = sorted(As[0])[target_index]
    return torch.stack([a[target] for a in As]), torch.stack([b[target] for b in Bs]), torch.tensor(groups)


def random_factors(n, d_out, d_in, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)


def dense(A, B):
    return B @ A  # (n, d_out, d_in)


def top_eig(M, r):
    return torch.linalg.eigh(M.double())[1][:, -r:].flip(-1).float()


def projector(U):
    return U @ U.T


@pytest.fixture(params=["exact", "krylov"])
def solver(request, monkeypatch):
    """Run each test with the exact eigen-solver and with block Krylov (forced on small shapes)."""
    if request.param == "krylov":
        monkeypatch.setattr(linalg, "EXACT_MAX_DIM", 4)
    return request.param


# ------------------------------------------------------------------------------ JD-Full


def test_jd_full_recovers_planted_shared_basis(solver):
    A, B, _ = stacked(PlantedSpec(n=40, modules=(("q_proj", 48, 40),), layers=1, r=4, shared_rank=6, noise=0.0))
    fit = jd.jd_full(A, B, r=6, iters=20, generator=torch.Generator().manual_seed(0))
    W = dense(A, B)
    rel = (W - fit.U @ fit.cores @ fit.V.T).norm(dim=(1, 2)) / W.norm(dim=(1, 2))
    assert W.norm(dim=(1, 2)).min() > 0.1  # non-vacuous: the adapters are far from zero
    assert rel.max() < 1e-5
    assert torch.allclose(fit.U.T @ fit.U, torch.eye(6), atol=1e-5)
    assert torch.allclose(fit.V.T @ fit.V, torch.eye(6), atol=1e-5)


def test_jd_full_error_vanishes_at_total_rank(solver):
    A, B = random_factors(n=5, d_out=24, d_in=20, r=3)  # total rank 15 per side
    fit = jd.jd_full(A, B, r=15, iters=3, generator=torch.Generator().manual_seed(0))
    W = dense(A, B)
    torch.testing.assert_close(fit.U @ fit.cores @ fit.V.T, W, atol=1e-4, rtol=1e-4)
    assert fit.errors.sum() / W.square().sum() < 1e-10


def test_jd_full_objective_never_increases_and_cores_are_projections(solver):
    A, B = random_factors(n=30, d_out=40, d_in=36, r=4, seed=1)
    fit = jd.jd_full(A, B, r=5, iters=15, tol=0, generator=torch.Generator().manual_seed(0))
    h = torch.tensor(fit.history)
    assert len(h) > 3 and h[-1] < h[0]  # it actually improved
    assert (h[1:] <= h[:-1] + 1e-6 * h[0]).all(), h
    W = dense(A, B)
    torch.testing.assert_close(fit.cores, fit.U.T @ W @ fit.V, atol=1e-4, rtol=1e-4)
    # Reported errors equal the dense residuals.
    dense_err = (W - fit.U @ fit.cores @ fit.V.T).square().sum((1, 2))
    torch.testing.assert_close(fit.errors, dense_err, rtol=1e-3, atol=1e-3)


def brute_force_jd_full(W, r, iters):
    """Dense reference: dominant-subspace init, then exact eigh alternation on d×d matrices."""
    U = top_eig(sum(w @ w.T for w in W), r)
    V = top_eig(sum(w.T @ w for w in W), r)
    history = []
    for _ in range(iters):
        U = top_eig(sum(w @ V @ V.T @ w.T for w in W), r)
        V = top_eig(sum(w.T @ U @ U.T @ w for w in W), r)
        history.append(float(sum((w - U @ U.T @ w @ V @ V.T).square().sum() for w in W)))
    return U, V, history


def test_jd_full_matches_brute_force():
    A, B = random_factors(n=12, d_out=20, d_in=16, r=3, seed=2)
    fit = jd.jd_full(A, B, r=4, iters=6, tol=0)
    U_ref, V_ref, hist_ref = brute_force_jd_full(dense(A, B), r=4, iters=6)
    torch.testing.assert_close(torch.tensor(fit.history[1:]), torch.tensor(hist_ref), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(projector(fit.U), projector(U_ref), atol=1e-4, rtol=0)
    torch.testing.assert_close(projector(fit.V), projector(V_ref), atol=1e-4, rtol=0)


def test_krylov_path_reaches_the_exact_optimum(monkeypatch):
    A, B = random_factors(n=20, d_out=30, d_in=28, r=3, seed=3)
    exact = jd.jd_full(A, B, r=4, iters=30, tol=0)
    monkeypatch.setattr(linalg, "EXACT_MAX_DIM", 4)
    approx = jd.jd_full(A, B, r=4, iters=30, tol=0, generator=torch.Generator().manual_seed(0))
    assert approx.history[-1] == pytest.approx(exact.history[-1], rel=1e-4)


def test_top_subspace_krylov_never_loses_to_its_warm_start(monkeypatch):
    monkeypatch.setattr(linalg, "EXACT_MAX_DIM", 4)
    g = torch.Generator().manual_seed(4)
    L, G = torch.randn(50, 60, 2, generator=g), torch.randn(50, 2, 2, generator=g)
    M = linalg.FactoredGram(L, G)
    dense_M = M.factor() @ M.factor().T
    for seed in range(5):
        U0 = torch.linalg.qr(torch.randn(60, 5, generator=torch.Generator().manual_seed(seed)))[0]
        U = linalg.top_subspace(M, 5, init=U0, generator=torch.Generator().manual_seed(seed), krylov_blocks=1)
        assert torch.trace(U.T @ dense_M @ U) >= torch.trace(U0.T @ dense_M @ U0) * (1 - 1e-6)
    best = torch.linalg.eigvalsh(dense_M.double())[-5:].sum()
    U = linalg.top_subspace(M, 5, generator=torch.Generator().manual_seed(0), krylov_blocks=6)
    assert float(torch.trace(U.T @ dense_M @ U)) == pytest.approx(float(best), rel=1e-4)


# ------------------------------------------------------------------------------ JD-Diag


def brute_force_jd_diag(W, U, V, iters):
    """Dense ALS with vectorised least squares, same update order as jd.jd_diag."""

    def cores(U, V):
        design = torch.stack([torch.outer(U[:, k], V[:, k]).flatten() for k in range(U.shape[1])], 1).double()
        return torch.linalg.lstsq(design, W.reshape(len(W), -1).T.double()).solution.T.float()  # (n, r)

    def objective(U, V, s):
        return float(sum((w - U @ torch.diag(si) @ V.T).square().sum() for w, si in zip(W, s)))

    s = cores(U, V)
    history = [objective(U, V, s)]
    for _ in range(iters):
        # U-step: [W_1 .. W_n] = U [S_1 Vᵀ .. S_n Vᵀ]
        Y = torch.cat([torch.diag(si) @ V.T for si in s], 1)
        X = torch.cat(list(W), 1)
        U = torch.linalg.lstsq(Y.T.double(), X.T.double()).solution.T.float()
        U, s = U / U.norm(dim=0), s * U.norm(dim=0)
        # V-step: [W_1ᵀ .. W_nᵀ] = V [S_1 Uᵀ .. S_n Uᵀ]
        Y = torch.cat([torch.diag(si) @ U.T for si in s], 1)
        X = torch.cat([w.T for w in W], 1)
        V = torch.linalg.lstsq(Y.T.double(), X.T.double()).solution.T.float()
        V, s = V / V.norm(dim=0), s * V.norm(dim=0)
        s = cores(U, V)
        history.append(objective(U, V, s))
    return U, V, s, history


def test_jd_diag_matches_brute_force_and_is_monotone():
    A, B = random_factors(n=10, d_out=18, d_in=14, r=3, seed=5)
    U0, V0 = jd.dominant_init(A, B, 5)
    fit = jd.jd_diag(A, B, r=5, iters=8, tol=0, init=(U0, V0))
    U_ref, V_ref, s_ref, hist_ref = brute_force_jd_diag(dense(A, B), U0, V0, iters=8)
    torch.testing.assert_close(torch.tensor(fit.history), torch.tensor(hist_ref), rtol=1e-3, atol=1e-3)
    h = torch.tensor(fit.history)
    assert h[-1] < 0.99 * h[0]
    assert (h[1:] <= h[:-1] + 1e-6 * h[0]).all(), h
    W = dense(A, B)
    recon = fit.U[None] * fit.cores[:, None, :] @ fit.V.T
    torch.testing.assert_close(recon, U_ref[None] * s_ref[:, None, :] @ V_ref.T, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(fit.errors, (W - recon).square().sum((1, 2)), rtol=1e-3, atol=1e-3)


def test_jd_diag_exact_on_diagonal_planted_collection():
    g = torch.Generator().manual_seed(6)
    U = torch.linalg.qr(torch.randn(20, 4, generator=g))[0]
    V = torch.linalg.qr(torch.randn(16, 4, generator=g))[0]
    s = torch.randn(8, 4, generator=g).abs() + 0.5
    B = U[None] * s[:, None, :]  # ΔW_i = U diag(s_i) Vᵀ
    A = V.T[None].expand(8, -1, -1).contiguous()
    fit = jd.jd_diag(A, B, r=4, iters=20)
    W = dense(A, B)
    assert float(fit.errors.sum() / W.square().sum()) < 1e-8


# --------------------------------------------------------------------------------- SVD


@pytest.mark.parametrize("r", [1, 2, 4])
def test_svd_per_adapter_matches_torch_truncation(r):
    A, B = random_factors(n=6, d_out=15, d_in=11, r=4, seed=7)
    U, s, V = jd.svd_per_adapter(A, B, r)
    for i, w in enumerate(dense(A, B)):
        u_ref, s_ref, vh_ref = torch.linalg.svd(w.double())
        torch.testing.assert_close(s[i].double(), s_ref[:r], rtol=1e-4, atol=1e-5)
        truncated = (u_ref[:, :r] * s_ref[:r]) @ vh_ref[:r]
        torch.testing.assert_close((U[i] * s[i]) @ V[i].T, truncated.float(), rtol=1e-4, atol=1e-4)
        tail = s_ref[r:].square().sum()
        torch.testing.assert_close(jd.svd_tail(A[i : i + 1], B[i : i + 1], r)[0].double(), tail, rtol=1e-3, atol=1e-6)


def test_svd_pads_ranks_above_the_adapter_rank():
    A, B = random_factors(n=2, d_out=10, d_in=9, r=2, seed=8)
    U, s, V = jd.svd_per_adapter(A, B, 5)
    assert U.shape == (2, 10, 5) and (s[:, 2:] == 0).all()
    torch.testing.assert_close((U * s[:, None, :]) @ V.transpose(1, 2), dense(A, B), atol=1e-5, rtol=1e-4)
