"""Compress a collection into a bank: per-slot fits, optionally with K clusters of adapters.

Clustering follows the extension in "Compress then Serve" (ICML 2025): alternate (a) fitting
each cluster's basis on every slot, and (b) moving every adapter to the cluster whose bases
reconstruct it best, the error summed over all slots, so one assignment holds for the whole
adapter. Clusters are seeded by farthest-point selection on each adapter's own SVD basis,
which makes the result deterministic for a seed and robust to planted groups.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import jd
from .bank import Bank, BankEntry, first_non_finite
from .peft_io import Collection

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): called after each unit of work."""


@dataclass
class CompressConfig:
    """How to compress a collection."""

    method: str = "jd-full"
    """jd-full (shared U, V; full r×r cores), jd-diag (diagonal cores) or svd (per adapter)."""
    rank: int = 16
    """rank r of the shared bases (of each adapter's truncation for svd)."""
    clusters: int = 1
    """number K of adapter clusters, each with its own bases (jd methods only)."""
    iters: int = 10
    """alternating iterations of the final fit of each slot and cluster."""
    cluster_iters: int = 10
    """maximum assignment rounds when clusters > 1."""
    tol: float = 1e-6
    """stop a fit when one iteration lowers the objective by less than tol × its initial value."""
    seed: int = 0
    """seed for the random parts (cluster seeding, Krylov blocks)."""
    device: str = "cpu"
    """cpu or cuda (cuda falls back to cpu, with a warning, where torch sees no GPU)."""
    dtype: str | None = None
    """dtype the bank is stored in; default: the adapters' own dtype (float32 if mixed)."""


def validate(collection: Collection, cfg: CompressConfig) -> None:
    """Raise ValueError for a config that cannot apply to this collection."""
    if cfg.method not in jd.METHODS:
        raise ValueError(f"method must be one of {', '.join(jd.METHODS)}; got {cfg.method!r}")
    if cfg.rank < 1:
        raise ValueError(f"rank must be >= 1; got {cfg.rank}")
    for s in collection.slots:
        if cfg.rank > min(s.in_features, s.out_features):
            raise ValueError(
                f"rank {cfg.rank} is larger than slot {s.name!r} allows "
                f"(min(out={s.out_features}, in={s.in_features}) = {min(s.in_features, s.out_features)})"
            )
    if cfg.clusters < 1 or cfg.clusters > len(collection):
        raise ValueError(f"clusters must be between 1 and the number of adapters ({len(collection)}); got {cfg.clusters}")
    if cfg.method == "svd" and cfg.clusters != 1:
        raise ValueError("clusters apply to jd-full and jd-diag; svd keeps one basis per adapter")
    if cfg.iters < 0 or cfg.cluster_iters < 0:
        raise ValueError(f"iters must be >= 0; got iters={cfg.iters}, cluster_iters={cfg.cluster_iters}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ValueError(f"device must be cpu or cuda; got {cfg.device!r}")
    if cfg.dtype is not None and cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {cfg.dtype!r}")


def compress(collection: Collection, cfg: CompressConfig | None = None, progress: Progress | None = None) -> Bank:
    """Fit a bank to the collection (see CompressConfig)."""
    cfg = cfg if cfg is not None else CompressConfig()
    validate(collection, cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn("device cuda was asked for but torch sees no CUDA device; running on cpu", stacklevel=2)
        cfg = replace(cfg, device="cpu")
    report = progress if progress is not None else (lambda phase, done, total: None)
    gen = torch.Generator().manual_seed(cfg.seed)
    factors = {s.name: collection.factors(s.name, cfg.device) for s in collection.slots}
    total_norm = sum(jd.sq_norms(A, B) for A, B in factors.values())  # (n,)

    if cfg.method == "svd":
        U, V, sigma, errors, history = _fit_svd(factors, cfg.rank, report)
        assign = torch.arange(len(collection))
    else:
        K = cfg.clusters
        if K == 1:
            assign = torch.zeros(len(collection), dtype=torch.long)
            clustering, warm = [], None
        else:
            assign, clustering, warm = _cluster(factors, total_norm, cfg, gen, report)
        U, V, sigma, errors, fit_history = _fit_clusters(factors, assign, cfg, cfg.iters, warm, gen, report, "fitting")
        denom = float(total_norm.sum()) or 1.0
        history = {"clustering": clustering, "fit": [h / denom for h in fit_history]}

    dtypes = {a.dtype for a in collection.adapters}
    dtype = cfg.dtype if cfg.dtype is not None else (str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32")
    stored = getattr(torch, dtype)
    bad = first_non_finite((f"{s}.{key}", t[s].to(stored)) for s in U for key, t in (("U", U), ("V", V), ("sigma", sigma)))
    if bad is not None:
        hint = "; values beyond float16's range: store float32 (--dtype float32)" if dtype == "float16" else ""
        raise ValueError(f"the fit produced NaN or Inf values in bank tensor {bad} (as {dtype}){hint}")
    if dtype != "float32":  # report the error of what is stored, rounding included
        errors = _stored_errors(factors, assign, U, V, sigma, stored)
    rel = (errors / total_norm.clamp_min(1e-30)).sqrt()
    rel[total_norm == 0] = 0.0
    entries = [
        BankEntry(
            name=a.name,
            index=i,
            cluster=int(assign[i]),
            slots=sorted(a.lora_A),
            r=a.r,
            lora_alpha=a.lora_alpha,
            use_rslora=a.use_rslora,
            alora_invocation_tokens=a.alora_invocation_tokens,
            rel_error=float(rel[i]),
            num_parameters=a.num_parameters(),
            bytes=a.num_parameters() * a.dtype.itemsize,
            config=a.config,
        )
        for i, a in enumerate(collection.adapters)
    ]
    targets = set()
    for a in collection.adapters:
        t = a.config.get("target_modules")
        targets |= {t} if isinstance(t, str) else set(t or [])
    return Bank(
        method=cfg.method,
        rank=cfg.rank,
        slots=collection.slots,
        U={s: u.cpu() for s, u in U.items()},
        V={s: v.cpu() for s, v in V.items()},
        sigma={s: x.cpu() for s, x in sigma.items()},
        entries=entries,
        base_model_name_or_path=collection.adapters[0].base_model_name_or_path,
        target_modules=sorted(targets),
        history=history,
        dtype=dtype,
    )


def _fit_svd(factors, r, report):
    U, V, sigma = {}, {}, {}
    errors = 0
    for j, (s, (A, B)) in enumerate(factors.items()):
        U[s], sigma[s], V[s] = jd.svd_per_adapter(A, B, r)
        errors = errors + jd.svd_tail(A, B, r)
        report("svd", j + 1, len(factors))
    return U, V, sigma, errors, {}


def _fit_clusters(factors, assign, cfg, iters, warm, gen, report, phase):
    """Fit every (slot, cluster); returns stacked U, V, cores, per-adapter errors, objective history."""
    K = cfg.clusters

    U, V, sigma = {}, {}, {}
    n, device = len(assign), next(iter(factors.values()))[0].device
    errors = torch.zeros(n, device=device)
    histories = []
    members = [(assign == k).nonzero().squeeze(1).to(device) for k in range(K)]
    for j, (s, (A, B)) in enumerate(factors.items()):
        Us, Vs = [], []
        cores = None
        for k in range(K):
            idx = members[k]
            init = warm[s][k] if warm is not None else None
            Ak, Bk = (A, B) if K == 1 else (A[idx], B[idx])  # indexing copies: skip it for K=1
            fit = jd.FITS[cfg.method](Ak, Bk, cfg.rank, iters, cfg.tol, init=init, generator=gen)
            Us.append(fit.U)
            Vs.append(fit.V)
            if cores is None:
                cores = fit.sigma.new_zeros((A.shape[0], *fit.sigma.shape[1:]))
            cores[idx] = fit.sigma
            errors[idx] += fit.errors
            histories.append(fit.history)
        U[s], V[s], sigma[s] = torch.stack(Us), torch.stack(Vs), cores
        report(phase, j + 1, len(factors))
    # Objectives of all slots and clusters add up; a fit that stopped early keeps its last value.
    steps = max(len(h) for h in histories)
    history = [sum(h[min(t, len(h) - 1)] for h in histories) for t in range(steps)]
    return U, V, sigma, errors, history


def _stored_errors(factors, assign, U, V, sigma, dtype) -> torch.Tensor:
    """Squared error of every adapter once bases and cores are rounded to `dtype`, (n,).

    Rounded bases are no longer orthonormal: U S Vᵀ = Qu (Ru S Rvᵀ) Qvᵀ with QR factors.
    """
    errors = 0
    for s, (A, B) in factors.items():
        Qu, Ru = torch.linalg.qr(U[s].to(dtype).float())  # (K, d_out, r)
        Qv, Rv = torch.linalg.qr(V[s].to(dtype).float())
        S = sigma[s].to(dtype).float()
        S = torch.diag_embed(S) if S.dim() == 2 else S  # (n, r, r)
        a = assign.to(A.device)
        C = Ru[a] @ S @ Rv[a].mT  # (n, r, r)
        e = torch.zeros(len(A), device=A.device)
        for k in a.unique().tolist():
            idx = (a == k).nonzero().squeeze(1)
            e[idx] = jd.residual_sq(A[idx], B[idx], Qu[k], Qv[k], C[idx])
        errors = errors + e
    return errors


def _errors_to_clusters(factors, U, V, method) -> torch.Tensor:
    """err[i, k]: squared error of adapter i under cluster k's bases, summed over slots, (n, K)."""
    K = next(iter(U.values())).shape[0]
    cols = []
    for k in range(K):
        e = 0
        for s, (A, B) in factors.items():
            e = e + jd.ERRORS[method](A, B, U[s][k], V[s][k])
        cols.append(e)
    return torch.stack(cols, 1).cpu()


def _seed_clusters(factors, total_norm, cfg, gen) -> torch.Tensor:
    """Farthest-point seeding: each new center is the adapter worst explained by the others."""
    n, K = total_norm.shape[0], cfg.clusters
    centers = [int(torch.randint(n, (1,), generator=gen))]
    rel = torch.full((n, K), float("inf"))
    denom = total_norm.cpu().clamp_min(1e-30)
    while True:
        c = centers[-1]
        err = 0
        for s, (A, B) in factors.items():
            Uc, _, Vc = jd.svd_per_adapter(A[c : c + 1], B[c : c + 1], cfg.rank)
            err = err + jd.full_errors(A, B, Uc[0], Vc[0])
        rel[:, len(centers) - 1] = err.cpu() / denom
        if len(centers) == K:
            break
        dist = rel[:, : len(centers)].min(1).values
        dist[centers] = -1.0
        centers.append(int(dist.argmax()))
    return rel.argmin(1)


def _fill_empty(assign: torch.Tensor, err: torch.Tensor, K: int) -> torch.Tensor:
    """Give every empty cluster the adapter worst served by its own cluster (from one of size > 1)."""
    assign = assign.clone()
    for k in range(K):
        if (assign == k).any():
            continue
        sizes = torch.bincount(assign, minlength=K)
        current = err.gather(1, assign[:, None]).squeeze(1).clone()
        current[sizes[assign] <= 1] = -float("inf")
        assign[int(current.argmax())] = k
    return assign


def _cluster(factors, total_norm, cfg, gen, report):
    K = cfg.clusters
    assign = _fill_empty(_seed_clusters(factors, total_norm, cfg, gen), torch.zeros(len(total_norm), K), K)
    warm = None
    history = []
    denom = float(total_norm.sum()) or 1.0
    inner = min(cfg.iters, 3)
    for t in range(cfg.cluster_iters):
        U, V, _, _, _ = _fit_clusters(factors, assign, cfg, inner, warm, gen, report, f"clustering {t + 1}")
        warm = {s: [(U[s][k], V[s][k]) for k in range(K)] for s in U}
        err = _errors_to_clusters(factors, U, V, cfg.method)
        new = _fill_empty(err.argmin(1), err, K)
        history.append(float(err.gather(1, new[:, None]).sum()) / denom)
        if torch.equal(new, assign):
            break
        assign = new
    return assign, history, warm
