"""Compress a collection into a bank: per-target fits, optionally with K clusters of adapters.

Clustering follows the extension in "Compress then Serve" (ICML 2025): alternate (a) fitting
each cluster's basis on every target, and (b) moving every adapter to the cluster whose bases
reconstruct it best, the error summed over all targets, so one assignment holds for the whole
adapter. Clusters are seeded by farthest-point selection on each adapter's own SVD basis, which
makes the result deterministic for a seed, and two starts are tried from the seeds: balanced
(⌈n/K⌉ each, greedy by regret) and nearest-seed; the one with the lower objective goes on.
Reassignment keeps every cluster at `min_cluster_size` or more (default ⌈n/(4K)⌉), and a round
is kept only when it lowers the objective. Left free, a large cluster's bases fit everyone a
little better than a small one's: on a collection without group structure the clusters
collapsed (76 / 12 / 11 / 1 of 100 adapters, 3.7× the error of an even split).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import jd
from .bank import Bank, BankEntry, first_non_finite
from .peft_io import Collection

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): called after each unit of work."""

DEFAULT_ITERS = {"jd-full": 100, "jd-diag": 500}
"""iteration caps of the final fits when CompressConfig.iters is None (ALS converges far slower)"""
WEIGHTINGS = ("uniform", "relative")
ROUND_ITERS = 3
"""iterations of each fit inside a clustering round; warm starts carry the fits on between rounds"""


@dataclass
class CompressConfig:
    """How to compress a collection."""

    method: str = "jd-full"
    """jd-full (shared U, V; full r×r cores), jd-diag (diagonal cores) or svd (per adapter)."""
    rank: int = 16
    """rank r of the shared bases (of each adapter's truncation for svd)."""
    clusters: int = 1
    """number K of adapter clusters, each with its own bases (jd methods only)."""
    iters: int | None = None
    """maximum alternating iterations of the final fit of each target and cluster; None: 100 for
    jd-full, 500 for jd-diag (fits stop earlier once converged, see tol)."""
    cluster_iters: int = 10
    """maximum assignment rounds when clusters > 1."""
    tol: float = 1e-4
    """a fit has converged once an iteration lowers its objective by less than tol × the previous value."""
    weighting: str = "uniform"
    """uniform: minimise Σ_i ‖ΔW_i − ΔŴ_i‖²; relative: Σ_i ‖ΔW_i − ΔŴ_i‖² / ‖ΔW_i‖² (norms over all
    targets), the squared relative errors, so adapters with large norms don't dominate the bases."""
    min_cluster_size: int | None = None
    """fewest adapters a cluster may hold; None: ⌈n/(4K)⌉, which keeps clusters from collapsing."""
    seed: int = 0
    """seed for the random parts (cluster seeding, Krylov blocks)."""
    device: str = "cpu"
    """cpu or cuda (cuda falls back to cpu, with a warning, where torch sees no GPU)."""
    dtype: str | None = None
    """dtype the bank is stored in; default: the adapters' own dtype (float32 if mixed)."""

    @property
    def max_iters(self) -> int:
        return self.iters if self.iters is not None else DEFAULT_ITERS.get(self.method, 0)

    def min_size(self, n: int) -> int:
        return self.min_cluster_size if self.min_cluster_size is not None else math.ceil(n / (4 * self.clusters))


def validate(collection: Collection, cfg: CompressConfig) -> None:
    """Raise ValueError for a config that cannot apply to this collection."""
    if cfg.method not in jd.METHODS:
        raise ValueError(f"method must be one of {', '.join(jd.METHODS)}; got {cfg.method!r}")
    if cfg.rank < 1:
        raise ValueError(f"rank must be >= 1; got {cfg.rank}")
    for t in collection.targets:
        if cfg.rank > min(t.in_features, t.out_features):
            raise ValueError(
                f"rank {cfg.rank} is larger than target {t.name!r} allows "
                f"(min(out={t.out_features}, in={t.in_features}) = {min(t.in_features, t.out_features)})"
            )
    if cfg.clusters < 1 or cfg.clusters > len(collection):
        raise ValueError(f"clusters must be between 1 and the number of adapters ({len(collection)}); got {cfg.clusters}")
    if cfg.method == "svd" and cfg.clusters != 1:
        raise ValueError("clusters apply to jd-full and jd-diag; svd keeps one basis per adapter")
    if (cfg.iters is not None and cfg.iters < 0) or cfg.cluster_iters < 0:
        raise ValueError(f"iters must be >= 0; got iters={cfg.iters}, cluster_iters={cfg.cluster_iters}")
    if not (math.isfinite(cfg.tol) and cfg.tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0; got {cfg.tol}")
    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {cfg.weighting!r}")
    most = len(collection) // cfg.clusters
    if cfg.min_cluster_size is not None and not 1 <= cfg.min_cluster_size <= most:
        raise ValueError(
            f"min_cluster_size must be between 1 and adapters // clusters ({len(collection)} // {cfg.clusters} = {most}); "
            f"got {cfg.min_cluster_size}"
        )
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
    factors = {t.name: collection.factors(t.name, cfg.device) for t in collection.targets}
    total_norm = sum(jd.sq_norms(A, B) for A, B in factors.values())  # (n,)

    if cfg.method == "svd":
        U, V, cores, errors, history = _fit_svd(factors, cfg.rank, report)
        assign = torch.arange(len(collection))
    else:
        weights = _weights(total_norm, cfg.weighting)
        if cfg.clusters == 1:
            assign = torch.zeros(len(collection), dtype=torch.long)
            clustering, warm = [], None
        else:
            assign, clustering, warm = _cluster(factors, total_norm, weights, cfg, gen, report)
        fit = _fit_clusters(factors, assign, weights, cfg, cfg.max_iters, warm, gen, report, "fitting")
        U, V, cores, errors = fit.U, fit.V, fit.cores, fit.errors
        denom = _objective_scale(total_norm, weights)
        history = {
            "clustering": clustering,
            "fit": [h / denom for h in fit.history],
            "iterations": fit.iterations,
            "converged": fit.converged,
            "max_iters": cfg.max_iters,
            "tol": cfg.tol,
            "weighting": cfg.weighting,
        }

    dtypes = {a.dtype for a in collection.adapters}
    dtype = cfg.dtype if cfg.dtype is not None else (str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32")
    stored = getattr(torch, dtype)
    tensors = (("U", U), ("V", V), ("cores", cores))
    bad = first_non_finite((f"{t}.{key}", x[t].to(stored)) for t in U for key, x in tensors)
    if bad is not None:
        hint = "; values beyond float16's range: store float32 (--dtype float32)" if dtype == "float16" else ""
        raise ValueError(f"the fit produced NaN or Inf values in bank tensor {bad} (as {dtype}){hint}")
    if dtype != "float32":  # report the error of what is stored, rounding included
        errors = _stored_errors(factors, assign, U, V, cores, stored)
    rel = (errors / total_norm.clamp_min(1e-30)).sqrt()
    rel[total_norm == 0] = 0.0
    entries = [
        BankEntry(
            name=a.name,
            index=i,
            cluster=int(assign[i]),
            targets=sorted(a.lora_A),
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
    modules = set()
    for a in collection.adapters:
        m = a.config.get("target_modules")
        modules |= {m} if isinstance(m, str) else set(m or [])
    return Bank(
        method=cfg.method,
        rank=cfg.rank,
        targets=collection.targets,
        U={t: u.cpu() for t, u in U.items()},
        V={t: v.cpu() for t, v in V.items()},
        cores={t: x.cpu() for t, x in cores.items()},
        entries=entries,
        base_model_name_or_path=collection.adapters[0].base_model_name_or_path,
        target_modules=sorted(modules),
        history=history,
        dtype=dtype,
    )


def _fit_svd(factors, r, report):
    U, V, cores = {}, {}, {}
    errors = 0
    for j, (t, (A, B)) in enumerate(factors.items()):
        U[t], cores[t], V[t] = jd.svd_per_adapter(A, B, r)
        errors = errors + jd.svd_tail(A, B, r)
        report("svd", j + 1, len(factors))
    return U, V, cores, errors, {}


def _weights(total_norm: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """Per-adapter weights of the objective, (n,), or None for uniform."""
    if weighting == "uniform":
        return None
    # w_i ‖ΔW_i − ΔŴ_i‖² summed over targets is adapter i's squared relative error (all targets together).
    return torch.where(total_norm > 0, 1 / total_norm.clamp_min(1e-30), torch.ones_like(total_norm))


def _objective_scale(total_norm, weights) -> float:
    """Σ w_i ‖ΔW_i‖², the objective of an all-zero bank: histories are relative to it."""
    scale = total_norm.sum() if weights is None else (weights * total_norm).sum()
    return float(scale) or 1.0


@dataclass
class _Fitted:
    """Every (target, cluster) fit of one assignment."""

    U: dict[str, torch.Tensor]
    """target → (K, d_out, r)"""
    V: dict[str, torch.Tensor]
    """target → (K, d_in, r)"""
    cores: dict[str, torch.Tensor]
    """target → (n, r, r) or (n, r)"""
    errors: torch.Tensor
    """(n,) squared error of each adapter (unweighted), all targets"""
    history: list[float]
    """weighted objective per iteration, all fits summed; a fit that stopped early keeps its last value"""
    iterations: dict[str, list[int]]
    """target → iterations of each cluster's fit"""
    converged: dict[str, list[bool]]
    """target → whether each cluster's fit met the tolerance"""


def _fit_clusters(factors, assign, weights, cfg, iters, warm, gen, report, phase) -> _Fitted:
    """Fit every (target, cluster) of an assignment, each for at most `iters` iterations."""
    K = cfg.clusters
    U, V, cores, iterations, converged = {}, {}, {}, {}, {}
    n, device = len(assign), next(iter(factors.values()))[0].device
    errors = torch.zeros(n, device=device)
    histories = []
    members = [(assign == k).nonzero().squeeze(1).to(device) for k in range(K)]
    for j, (t, (A, B)) in enumerate(factors.items()):
        Us, Vs = [], []
        rows = None  # (n, r, r) or (n, r): the cores of every cluster's members
        iterations[t], converged[t] = [], []
        for k in range(K):
            idx = members[k]
            init = warm[t][k] if warm is not None else None
            Ak, Bk = (A, B) if K == 1 else (A[idx], B[idx])  # indexing copies: skip it for K=1
            wk = None if weights is None else weights[idx]
            fit = jd.FITS[cfg.method](Ak, Bk, cfg.rank, iters, cfg.tol, init=init, generator=gen, weights=wk)
            Us.append(fit.U)
            Vs.append(fit.V)
            if rows is None:
                rows = fit.cores.new_zeros((A.shape[0], *fit.cores.shape[1:]))
            rows[idx] = fit.cores
            errors[idx] += fit.errors
            histories.append(fit.history)
            iterations[t].append(fit.iterations)
            converged[t].append(fit.converged)
        U[t], V[t], cores[t] = torch.stack(Us), torch.stack(Vs), rows
        report(phase, j + 1, len(factors))
    # Objectives of all targets and clusters add up; a fit that stopped early keeps its last value.
    steps = max(len(h) for h in histories)
    history = [sum(h[min(step, len(h) - 1)] for h in histories) for step in range(steps)]
    return _Fitted(U, V, cores, errors, history, iterations, converged)


def _stored_errors(factors, assign, U, V, cores, dtype) -> torch.Tensor:
    """Squared error of every adapter once bases and cores are rounded to `dtype`, (n,).

    Rounded bases are no longer orthonormal: U Σ Vᵀ = Qu (Ru Σ Rvᵀ) Qvᵀ with QR factors.
    """
    errors = 0
    for t, (A, B) in factors.items():
        Qu, Ru = torch.linalg.qr(U[t].to(dtype).float())  # (K, d_out, r)
        Qv, Rv = torch.linalg.qr(V[t].to(dtype).float())
        core = cores[t].to(dtype).float()
        core = torch.diag_embed(core) if core.dim() == 2 else core  # (n, r, r)
        a = assign.to(A.device)
        C = Ru[a] @ core @ Rv[a].mT  # (n, r, r)
        e = torch.zeros(len(A), device=A.device)
        for k in a.unique().tolist():
            idx = (a == k).nonzero().squeeze(1)
            e[idx] = jd.residual_sq(A[idx], B[idx], Qu[k], Qv[k], C[idx])
        errors = errors + e
    return errors


def _errors_to_clusters(factors, U, V, method) -> torch.Tensor:
    """err[i, k]: squared error of adapter i under cluster k's bases, summed over targets, (n, K)."""
    K = next(iter(U.values())).shape[0]
    cols = []
    for k in range(K):
        e = 0
        for t, (A, B) in factors.items():
            e = e + jd.ERRORS[method](A, B, U[t][k], V[t][k])
        cols.append(e)
    return torch.stack(cols, 1).cpu()


def _seed_distances(factors, total_norm, cfg, gen) -> torch.Tensor:
    """Farthest-point seeds, each the adapter worst explained by the others' own rank-r SVD bases.

    Returns rel[i, k], the relative squared error of adapter i on seed k's bases, (n, K).
    """
    n, K = total_norm.shape[0], cfg.clusters
    centers = [int(torch.randint(n, (1,), generator=gen))]
    rel = torch.full((n, K), float("inf"))
    denom = total_norm.cpu().clamp_min(1e-30)
    while True:
        c = centers[-1]
        err = 0
        for t, (A, B) in factors.items():
            Uc, _, Vc = jd.svd_per_adapter(A[c : c + 1], B[c : c + 1], cfg.rank)
            err = err + jd.full_errors(A, B, Uc[0], Vc[0])
        rel[:, len(centers) - 1] = err.cpu() / denom
        if len(centers) == K:
            return rel
        dist = rel[:, : len(centers)].min(1).values
        dist[centers] = -1.0
        centers.append(int(dist.argmax()))


def _balanced(dist: torch.Tensor) -> torch.Tensor:
    """Each adapter to its nearest cluster with room left (⌈n/K⌉ each), largest regret first, (n,)."""
    n, K = dist.shape
    room = torch.full((K,), -(-n // K))
    ranked = dist.sort(1).values
    regret = ranked[:, 1] - ranked[:, 0] if K > 1 else torch.zeros(n)
    assign = torch.empty(n, dtype=torch.long)
    for i in regret.argsort(descending=True, stable=True).tolist():
        k = int(torch.where(room > 0, dist[i], float("inf")).argmin())
        assign[i] = k
        room[k] -= 1
    return assign


def _enforce_min_size(assign: torch.Tensor, err: torch.Tensor, K: int, min_size: int = 1) -> torch.Tensor:
    """Fill every cluster up to `min_size` by the cheapest moves err[i, k] − err[i, a_i], taken
    from clusters that keep `min_size` without the adapter (so a singleton is never emptied)."""
    assign = assign.clone()
    sizes = torch.bincount(assign, minlength=K)
    current = err.gather(1, assign[:, None]).squeeze(1)
    while True:
        short = (sizes < min_size).nonzero().squeeze(1)
        if len(short) == 0:
            return assign
        cost = err[:, short] - current[:, None]  # (n, clusters short of min_size)
        cost[sizes[assign] <= min_size] = float("inf")
        i, j = divmod(int(cost.argmin()), len(short))
        k = int(short[j])
        sizes[assign[i]] -= 1
        sizes[k] += 1
        assign[i], current[i] = k, err[i, k]


def _cluster(factors, total_norm, weights, cfg, gen, report):
    """Assignment, objective per round (relative), and the bases the final fit starts from.

    Two starts are fitted once: balanced (⌈n/K⌉ per cluster) and nearest-seed (sizes as they
    fall, filled up to the floor); the lower objective goes on. Nearest-seed finds planted
    groups of unequal sizes, balanced avoids the collapse on collections without groups. Each
    round then moves adapters to their best clusters under the size floor, and the move is kept
    only if it lowers the objective under the bases just fitted; the warm-started refit can
    only lower it further, so the rounds never raise the objective and the result is the best
    assignment seen, never worse than the better start.
    """
    K, n = cfg.clusters, len(total_norm)
    min_size = cfg.min_size(n)
    w = (weights if weights is not None else torch.ones_like(total_norm)).cpu()[:, None]  # (n, 1)
    denom = _objective_scale(total_norm, weights)
    inner = min(cfg.max_iters, ROUND_ITERS)

    def fit_round(assign, warm, phase):
        fit = _fit_clusters(factors, assign, weights, cfg, inner, warm, gen, report, phase)
        warm = {t: [(fit.U[t][k], fit.V[t][k]) for k in range(K)] for t in fit.U}
        return warm, _errors_to_clusters(factors, fit.U, fit.V, cfg.method) * w  # (n, K), weighted

    def cost(assign, err) -> float:
        return float(err.gather(1, assign[:, None]).sum())

    dist = _seed_distances(factors, total_norm, cfg, gen)
    starts = {"balanced": _balanced(dist), "nearest-seed": _enforce_min_size(dist.argmin(1), dist, K, min_size)}
    if cfg.cluster_iters == 0:
        return starts["balanced"], [], None
    if torch.equal(*starts.values()):
        del starts["nearest-seed"]
    fitted = [(a, *fit_round(a, None, f"clustering 1 ({name} start)")) for name, a in starts.items()]
    assign, warm, err = min(fitted, key=lambda f: cost(f[0], f[2]))
    history = []
    for t in range(cfg.cluster_iters):
        if t > 0:
            warm, err = fit_round(assign, warm, f"clustering {t + 1}")
        new = _enforce_min_size(err.argmin(1), err, K, min_size)
        before, after = cost(assign, err), cost(new, err)
        if not after < before:
            history.append(before / denom)
            break
        history.append(after / denom)
        assign = new
    return assign, history, warm
