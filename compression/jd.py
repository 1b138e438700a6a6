"""Joint diagonalization of a LoRA collection on one target: JD-Full, JD-Diag, per-adapter SVD.

Following Brüel-Gabrielsson et al., "Compress then Serve: Serving Thousands of LoRA Adapters
with Little Overhead" (ICML 2025). For adapters ΔW_i = B_i A_i of one target (adapted layer):

- JD-Full:  ΔW_i ≈ U Σ_i Vᵀ, U (d_out×r), V (d_in×r) orthonormal and shared, Σ_i full r×r.
  For fixed U, V the best core is Σ_i = Uᵀ ΔW_i V, so the fit maximises Σ_i ‖Uᵀ ΔW_i V‖²_F:
  alternate U ← top-r(Σ ΔW_i V Vᵀ ΔW_iᵀ) and V ← top-r(Σ ΔW_iᵀ U Uᵀ ΔW_i).
- JD-Diag:  ΔW_i ≈ U diag(s_i) Vᵀ with U, V unconstrained; alternating least squares.
- SVD:      each adapter truncated to rank r on its own (the uncompressed-basis baseline).

All work is on the factors: shapes below are A (n, r_i, d_in), B (n, d_out, r_i), zero-padded
to a common r_i. Objectives are total squared Frobenius errors Σ_i w_i ‖ΔW_i − ΔŴ_i‖²_F, with
w_i = 1 unless `weights` are given (w_i = 1/‖ΔW_i‖² minimises the squared *relative* errors, like
the reference's eigen-iteration variant). Weighting only moves the shared bases: for fixed U, V
each adapter's best core does not depend on w_i, so a weighted fit is the unweighted fit of the
adapters scaled by √w_i, with the cores of the unscaled ones.

Both fits iterate until an iteration lowers the objective by less than `tol` × its previous
value (`TargetFit.converged`), or `iters` iterations, and never increase it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .linalg import FactoredGram, top_subspace


@dataclass
class TargetFit:
    """Shared basis and per-adapter cores of one target (and one cluster)."""

    U: torch.Tensor
    """(d_out, r)"""
    V: torch.Tensor
    """(d_in, r)"""
    cores: torch.Tensor
    """(n, r, r) for JD-Full, (n, r) for JD-Diag"""
    errors: torch.Tensor
    """(n,) squared Frobenius error of each adapter"""
    history: list[float] = field(default_factory=list)
    """objective (weighted total squared error) at init and after each iteration"""
    converged: bool = False
    """the last iteration lowered the objective by less than tol × its previous value"""

    @property
    def iterations(self) -> int:
        """alternating iterations run"""
        return len(self.history) - 1


def _converged(history: list[float], tol: float) -> bool:
    # Relative to the current value, not the initial one: a slow ALS tail (JD-Diag at r = 32
    # still gains 1e-4 per step after 100 steps) is not cut short by a large starting error.
    return history[-2] - history[-1] <= tol * history[-2]


def _weighted(B: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """B_i √w_i: the fit of the scaled adapters minimises Σ w_i ‖ΔW_i − ΔŴ_i‖², (n, d_out, r_i)."""
    return B if weights is None else B * weights.to(B).sqrt()[:, None, None]


def sq_norms(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖B_i A_i‖²_F = tr(B_iᵀB_i A_iA_iᵀ) for every i, (n,)."""
    return ((B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))).sum((1, 2))


def _gram_root(X: torch.Tensor) -> torch.Tensor:
    """G with G Gᵀ = X Xᵀ for X (n, r, d): the transposed R of a QR of Xᵀ, (n, r, r)."""
    _, R = torch.linalg.qr(X.transpose(1, 2))
    return R.transpose(1, 2)


def dominant_init(A, B, r, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """U, V spanning the dominant column / row spaces of the whole collection."""
    U = top_subspace(FactoredGram(B, _gram_root(A)), r, generator=generator)  # Σ ΔW ΔWᵀ
    V = top_subspace(FactoredGram(A.transpose(1, 2), _gram_root(B.transpose(1, 2))), r, generator=generator)
    return U, V


# ----------------------------------------------------------------------------------- JD-Full


def full_cores(A, B, U, V) -> torch.Tensor:
    """Σ_i = Uᵀ B_i A_i V, (n, r, r)."""
    return (U.T @ B) @ (A @ V)


def residual_sq(A, B, Qu, Qv, C=None) -> torch.Tensor:
    """‖ΔW_i − Qu C_i Qvᵀ‖²_F for orthonormal Qu, Qv, (n,); C_i = QuᵀΔW_iQv when None.

    Qu (d_out, r) and Qv (d_in, r) are shared, or batched per adapter as (n, d, r).

    Splits the residual into orthogonal parts, (I−QuQuᵀ)ΔW, QuᵀΔW(I−QvQvᵀ) and the core
    mismatch, instead of ‖ΔW‖² − ‖Σ‖²: that difference cancels catastrophically in float32 and
    would floor relative errors at ~3e-4 when the fit is nearly exact.
    """
    Y = Qu.mT @ B  # (n, r, r_i)
    Bp = B - Qu @ Y  # (n, d_out, r_i)
    Z = A @ Qv  # (n, r_i, r)
    Ap = A - Z @ Qv.mT  # (n, r_i, d_in)
    AAt = A @ A.transpose(1, 2)
    err = ((Bp.transpose(1, 2) @ Bp) * AAt).sum((1, 2))
    err = err + ((Y.transpose(1, 2) @ Y) * (Ap @ Ap.transpose(1, 2))).sum((1, 2))
    if C is not None:
        err = err + (Y @ Z - C).square().sum((1, 2))
    return err


def full_errors(A, B, U, V) -> torch.Tensor:
    """‖ΔW_i − U Σ_i Vᵀ‖² with the best Σ_i = UᵀΔW_iV, (n,)."""
    return residual_sq(A, B, U, V)


def jd_full(A, B, r, iters=100, tol=1e-4, init=None, generator=None, weights=None) -> TargetFit:
    """Fit shared orthonormal U, V and full cores; the objective is non-increasing.

    `weights` (n,): minimise Σ w_i ‖ΔW_i − U Σ_i Vᵀ‖², i.e. the Gram operators Σ w_i ΔW_i V Vᵀ ΔW_iᵀ.
    """
    Bw = _weighted(B, weights)
    U, V = init if init is not None else dominant_init(A, Bw, r, generator)
    history = [float(full_errors(A, Bw, U, V).sum())]
    converged = False
    for _ in range(iters):
        U = top_subspace(FactoredGram(Bw, A @ V), r, init=U, generator=generator)
        V = top_subspace(FactoredGram(A.transpose(1, 2), Bw.transpose(1, 2) @ U), r, init=V, generator=generator)
        history.append(float(full_errors(A, Bw, U, V).sum()))
        converged = _converged(history, tol)
        if converged:
            break
    errors = full_errors(A, B, U, V)
    return TargetFit(U, V, full_cores(A, B, U, V), errors, history, converged)


# ----------------------------------------------------------------------------------- JD-Diag


def _solve_spd(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """M⁻¹ rhs for a symmetric PSD M (r, r), in float64 with a vanishing ridge for rank loss."""
    M64 = M.double()
    ridge = 1e-12 * M64.diagonal().sum().clamp_min(1e-300) / M.shape[0]
    eye = torch.eye(M.shape[0], dtype=torch.float64, device=M.device)
    return torch.linalg.solve(M64 + ridge * eye, rhs.double()).to(rhs.dtype)


def _diag_terms(A, B, U, V):
    d = ((B.transpose(1, 2) @ U) * (A @ V)).sum(1)  # diag(Uᵀ ΔW_i V), (n, r)
    G = (U.T @ U) * (V.T @ V)  # (r, r)
    return d, G


def diag_cores(A, B, U, V) -> torch.Tensor:
    """Least-squares s_i of ΔW_i ≈ U diag(s_i) Vᵀ: (UᵀU ∘ VᵀV) s_i = diag(Uᵀ ΔW_i V), (n, r)."""
    d, G = _diag_terms(A, B, U, V)
    return _solve_spd(G, d.T).T


def diag_errors(A, B, U, V, s=None) -> torch.Tensor:
    """‖ΔW_i − U diag(s_i) Vᵀ‖² (with least-squares s_i unless given), (n,)."""
    s = diag_cores(A, B, U, V) if s is None else s
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V)
    return residual_sq(A, B, Qu, Qv, (Ru * s[:, None, :]) @ Rv.T)  # U S Vᵀ = Qu (Ru S Rvᵀ) Qvᵀ


def _diag_objective(A, B, U, V, norms, s) -> torch.Tensor:
    # Cheap form for the ALS loop: ‖ΔW‖² − 2 sᵀd + sᵀGs (it may cancel near an exact fit).
    d, G = _diag_terms(A, B, U, V)
    return (norms - 2 * (s * d).sum(1) + ((s @ G) * s).sum(1)).clamp_min(0)


def _normalize_columns(X, s):
    # The product U diag(s) Vᵀ is unchanged; unit columns keep the ALS systems well scaled.
    norms = X.norm(dim=0).clamp_min(1e-30)
    return X / norms, s * norms


def jd_diag(A, B, r, iters=500, tol=1e-4, init=None, generator=None, weights=None) -> TargetFit:
    """Alternating least squares over U, V and diagonal cores; the objective is non-increasing.

    `weights` (n,): minimise Σ w_i ‖ΔW_i − U diag(s_i) Vᵀ‖² (the ALS of the adapters scaled by √w_i).
    """
    Bw = _weighted(B, weights)
    norms = sq_norms(A, Bw)
    U, V = init if init is not None else dominant_init(A, Bw, r, generator)
    s = diag_cores(A, Bw, U, V)
    history = [float(_diag_objective(A, Bw, U, V, norms, s).sum())]
    converged = False
    for _ in range(iters):
        SS = s.T @ s  # Σ_i s_i s_iᵀ, (r, r)
        rhs = torch.einsum("nok,nkr->or", Bw, (A @ V) * s[:, None, :])  # Σ ΔW_i V S_i
        U = _solve_spd((V.T @ V) * SS, rhs.T).T
        U, s = _normalize_columns(U, s)
        SS = s.T @ s
        rhs = torch.einsum("nki,nkr->ir", A, (Bw.transpose(1, 2) @ U) * s[:, None, :])  # Σ ΔW_iᵀ U S_i
        V = _solve_spd((U.T @ U) * SS, rhs.T).T
        V, s = _normalize_columns(V, s)
        s = diag_cores(A, Bw, U, V)
        history.append(float(_diag_objective(A, Bw, U, V, norms, s).sum()))
        converged = _converged(history, tol)
        if converged:
            break
    if weights is not None:  # least-squares cores of the unscaled adapters
        s = diag_cores(A, B, U, V)
    return TargetFit(U, V, s, diag_errors(A, B, U, V, s=s), history, converged)


# ------------------------------------------------------------------------------------- SVD


def svd_per_adapter(A, B, r) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of each ΔW_i from its factors: U (n, d_out, r), s (n, r), V (n, d_in, r).

    Ranks above an adapter's own are zero-padded. The squared error of the truncation is the
    tail energy, `svd_tail(A, B, r)`.
    """
    Qa, Ra = torch.linalg.qr(A.transpose(1, 2))  # A_iᵀ = Qa Ra
    Qb, Rb = torch.linalg.qr(B)  # B_i = Qb Rb, so ΔW_i = Qb (Rb Raᵀ) Qaᵀ
    u, s, vh = torch.linalg.svd((Rb @ Ra.transpose(1, 2)).double())
    k = min(r, s.shape[1])
    U = Qb @ u[..., :k].to(Qb.dtype)
    V = Qa @ vh.transpose(1, 2)[..., :k].to(Qa.dtype)
    s = s[:, :k].to(A.dtype)
    if k < r:
        pad = r - k
        U = torch.nn.functional.pad(U, (0, pad))
        V = torch.nn.functional.pad(V, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
    return U, s, V


def svd_tail(A, B, r) -> torch.Tensor:
    """Σ_{j>r} s_j(ΔW_i)², the squared error of each rank-r truncation, (n,)."""
    _, Ra = torch.linalg.qr(A.transpose(1, 2))
    _, Rb = torch.linalg.qr(B)
    s = torch.linalg.svdvals((Rb @ Ra.transpose(1, 2)).double())
    return s[:, r:].square().sum(1).to(A.dtype)


METHODS = ("jd-full", "jd-diag", "svd")
FITS = {"jd-full": jd_full, "jd-diag": jd_diag}
CORES = {"jd-full": full_cores, "jd-diag": diag_cores}
ERRORS = {"jd-full": full_errors, "jd-diag": diag_errors}
