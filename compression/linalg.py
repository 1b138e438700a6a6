"""Dominant subspaces of Gram operators given in factored form, never as dense ΔW products.

Every JD update is "the top-r eigenspace of M = Σ_i P_i P_iᵀ" where P_i = L_i G_i is a thin
(d × w) product of an adapter factor L_i (d × r_i) and a small matrix G_i (r_i × w). For a
collection of 1000 rank-16 adapters of a 4096×4096 layer, M is 4096×4096 but the ΔW_i would
be 64 GB, so M is only ever applied to thin blocks (`apply`), or formed when it is small.

Small problems are solved exactly (eigh in float64). Large ones use block Krylov with a
Rayleigh–Ritz step over a subspace that *contains the warm start*, which makes each update
at least as good as the previous basis: the JD objectives stay monotone.
"""

from __future__ import annotations

import torch

EXACT_MAX_DIM = 512
"""Solve exactly (eigh in float64 of M or of its n·w Gram, whichever is smaller) up to this
size; beyond it eigh costs more than a few Krylov passes and its time varies a lot on CPUs."""


class FactoredGram:
    """M = Σ_i (L_i G_i)(L_i G_i)ᵀ with L (n, d, r) and G (n, r, w)."""

    def __init__(self, L: torch.Tensor, G: torch.Tensor):
        assert L.dim() == 3 and G.dim() == 3 and L.shape[0] == G.shape[0] and L.shape[2] == G.shape[1]
        self.L, self.G = L, G

    @property
    def dim(self) -> int:
        return self.L.shape[1]

    @property
    def width(self) -> int:
        return self.G.shape[0] * self.G.shape[2]

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """M @ X for X (d, p), in two thin passes over L."""
        Y = torch.matmul(self.L.transpose(1, 2), X)  # (n, r, p)
        Y = torch.bmm(self.G, torch.bmm(self.G.transpose(1, 2), Y))  # (n, r, p)
        n, d, r = self.L.shape
        return self.L.transpose(0, 1).reshape(d, n * r) @ Y.reshape(n * r, -1)  # (d, p)

    def factor(self) -> torch.Tensor:
        """P = [L_1 G_1, ..., L_n G_n], (d, n·w)."""
        P = torch.bmm(self.L, self.G)  # (n, d, w)
        return P.transpose(0, 1).reshape(self.dim, -1)


def _orth(X: torch.Tensor) -> torch.Tensor:
    # Two passes of QR keep orthogonality in float32 even when columns are nearly dependent.
    Q, _ = torch.linalg.qr(X)
    Q, _ = torch.linalg.qr(Q)
    return Q


def top_subspace(
    M: FactoredGram,
    r: int,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    krylov_blocks: int = 3,
) -> torch.Tensor:
    """Orthonormal basis (d, r) of the top-r eigenspace of M.

    Exact when d or n·w is small. Otherwise block Krylov from `init` (d, r): the result's
    captured energy tr(Uᵀ M U) is never below that of `init`.
    """
    d = M.dim
    assert 0 < r <= d
    if min(d, M.width) > EXACT_MAX_DIM:
        return _krylov(M, r, init, generator, krylov_blocks)
    P = M.factor().double()  # (d, n·w)
    if d <= M.width:
        _, evecs = torch.linalg.eigh(P @ P.T)
        return evecs[:, -r:].flip(-1).to(M.L.dtype).contiguous()
    # Left singular vectors of P from the small Gram PᵀP: U = P W Λ^{-1/2}.
    evals, evecs = torch.linalg.eigh(P.T @ P)
    evals, evecs = evals[-r:].flip(-1), evecs[:, -r:].flip(-1)
    keep = evals > 1e-12 * evals[0].clamp_min(1e-300)  # M may have rank < r
    U = P @ (evecs[:, keep] / evals[keep].sqrt())
    if int(keep.sum()) < r:
        U = torch.cat([U, _random(d, r, M.L, generator).double()], 1)
        U = torch.linalg.qr(U)[0][:, :r]
    return _orth(U).to(M.L.dtype).contiguous()


def _random(d: int, p: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(d, p, generator=generator, dtype=like.dtype).to(like.device)


def _krylov(M, r, init, generator, blocks):
    d = M.dim
    p = min(r, max(d - r, 1))  # oversampling columns beside the warm start
    X = _random(d, p, M.L, generator)
    if init is not None:
        X = torch.cat([init.to(X), X], 1)
    else:
        X = torch.cat([X, _random(d, r, M.L, generator)], 1)
    basis = [_orth(X)]
    images = []
    for _ in range(blocks):
        Y = M.apply(basis[-1])
        images.append(Y)
        Q = torch.cat(basis, 1)
        if Q.shape[1] + Y.shape[1] > d:
            break
        # Project out the basis so far and normalise, until orthogonal: when M has low rank the
        # projected block is rounding noise that still leans on Q after one or two passes.
        for _ in range(4):
            Y = _orth(Y - Q @ (Q.T @ Y))
            if (Q.T @ Y).abs().max() < 1e-6:
                break
        basis.append(Y)
    if len(images) < len(basis):
        images.append(M.apply(basis[-1]))
    Q = torch.cat(basis, 1)  # (d, k)
    T = (Q.T @ torch.cat(images, 1)).double()  # Qᵀ M Q, (k, k)
    T = (T + T.T) / 2
    _, W = torch.linalg.eigh(T)
    return _orth(Q @ W[:, -r:].flip(-1).to(Q.dtype)).contiguous()
