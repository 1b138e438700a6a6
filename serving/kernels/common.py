"""What bank_lora and dense_lora share: grouping the tokens of a batch by basis (cluster or
adapter), argument checks, the grouped torch path, and benchmark helpers.

Grouping follows SGMV (Punica, Chen et al., 2023): tokens that share a basis are made
contiguous so the shrink and expand are matrix products over a group, not per-token GEMVs.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int32, torch.int64)


@dataclass
class BankGroups:
    """The adapted tokens of one batch, sorted by cluster. `group_by_cluster` builds it once per
    forward; every layer's call then reuses it with no host sync and no sorting."""

    n_tokens: int
    """T, the batch size the groups were built for."""
    token_idx: torch.Tensor
    """(n,) int64 rows of the adapted tokens, stably sorted by cluster."""
    core_idx: torch.Tensor
    """(n,) int64 core (adapter) id of each of those rows."""
    clusters: list[int]
    """Cluster id of each group, ascending."""
    bounds: list[tuple[int, int]]
    """[start, end) of each group in `token_idx`."""
    identity: bool
    """token_idx == arange(T): every token is adapted and already in cluster order."""
    single_core: int | None
    """The core id shared by every adapted token, or None."""
    max_core: int
    """Largest core id (-1 when no token is adapted): lets each call range-check for free."""
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_adapted(self) -> int:
        return self.token_idx.numel()

    @property
    def pad_size(self) -> int:
        """m, the largest group: the padded layout has len(clusters) * m rows."""
        return max((e - b for b, e in self.bounds), default=0)

    def tiles(self, block_size_m: int) -> torch.Tensor:
        """(3, n_tiles) int32 rows (group id, start, length): each group cut into runs of at
        most block_size_m tokens, one Triton program row each. Cached per forward."""
        key = ("tiles", block_size_m)
        if key not in self._cache:
            rows = [
                (k, s, min(block_size_m, end - s))
                for k, (begin, end) in zip(self.clusters, self.bounds)
                for s in range(begin, end, block_size_m)
            ]
            tiles = torch.tensor(rows, dtype=torch.int32).T.contiguous()  # (3, n_tiles)
            self._cache[key] = tiles.to(self.token_idx.device)
        return self._cache[key]

    def unadapted(self) -> torch.Tensor:
        """(T, 1) bool: True on the rows no adapter touches. Cached."""
        if "unadapted" not in self._cache:
            m = torch.ones(self.n_tokens, 1, dtype=torch.bool, device=self.token_idx.device)
            self._cache["unadapted"] = m.index_fill_(0, self.token_idx, False)
        return self._cache["unadapted"]

    def padded(self, n_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every group padded to m rows, for one bmm over all groups: token rows (G*m,), core
        ids (G*m,), pad mask (G*m, 1) and group ids (G,). A pad repeats its group's last token,
        so every index stays valid; the caller zeroes pad rows before they are added. With
        n_groups (K), all K groups get their m rows, the absent ones only pads, so the bmm reads
        the weights as they are instead of a gathered copy (group ids are then arange(K)). Cached."""
        key = ("padded", n_groups)
        if key not in self._cache:
            m = self.pad_size
            present = dict(zip(self.clusters, self.bounds))
            bounds = self.bounds if n_groups is None else [present.get(k, (0, 0)) for k in range(n_groups)]
            pos = [max(min(b + j, e - 1), 0) for b, e in bounds for j in range(m)]
            pad = [b + j >= e for b, e in bounds for j in range(m)]
            dev = self.token_idx.device
            pos_t = torch.tensor(pos, device=dev)  # (G*m,)
            self._cache[key] = (
                self.token_idx.index_select(0, pos_t),
                self.core_idx.index_select(0, pos_t),
                torch.tensor(pad, device=dev).unsqueeze(1),
                torch.tensor(self.clusters if n_groups is None else list(range(n_groups)), device=dev),
            )
        return self._cache[key]


def group_by_cluster(cluster_ids: torch.Tensor, core_ids: torch.Tensor) -> BankGroups:
    """Sort the adapted tokens (core_ids >= 0) by cluster. One host sync; call once per forward
    (dense LoRA reuses it as `group_by_cluster(adapter_ids, adapter_ids)`)."""
    for name, ids in (("cluster_ids", cluster_ids), ("core_ids", core_ids)):
        check_ids(name, ids, cluster_ids.numel(), cluster_ids.device)
    T = cluster_ids.numel()
    tok = torch.nonzero(core_ids >= 0).squeeze(1)  # (n,)
    n = tok.numel()
    if n == 0:
        return BankGroups(T, tok, tok, [], [], False, None, -1)
    clusters, order = torch.sort(cluster_ids.index_select(0, tok).long(), stable=True)  # (n,)
    tok = tok.index_select(0, order)  # (n,)
    core = core_ids.index_select(0, tok).long()  # (n,)
    uniq, counts = torch.unique_consecutive(clusters, return_counts=True)  # (G,)
    in_order = (tok == torch.arange(n, device=tok.device)).all().long()
    # everything the host needs in one transfer: the sync is the cost on CUDA
    host = torch.cat([uniq, counts, torch.stack([core.min(), core.max(), in_order])]).tolist()
    G = uniq.numel()
    ends = list(itertools.accumulate(host[G : 2 * G]))
    bounds = list(zip([0] + ends[:-1], ends))
    core_min, core_max, ordered = host[2 * G :]
    single = core_min if core_min == core_max else None
    return BankGroups(T, tok, core, host[:G], bounds, n == T and bool(ordered), single, core_max)


def resolve_groups(groups, group_ids, core_ids, n_groups, n_cores, names) -> BankGroups:
    """Build the groups if the caller did not, and range-check ids from their host copy."""
    g = groups if groups is not None else group_by_cluster(group_ids, core_ids)
    if g.n_tokens != group_ids.numel():
        raise ValueError(f"groups: built for {g.n_tokens} tokens, the batch has {group_ids.numel()}")
    if g.clusters and not (0 <= g.clusters[0] and g.clusters[-1] < n_groups):
        raise ValueError(
            f"{names[0]}: ids of adapted tokens span [{g.clusters[0]}, {g.clusters[-1]}], "
            f"accepted [0, {n_groups})"
        )
    if g.max_core >= n_cores:
        raise ValueError(f"{names[1]}: max id {g.max_core}, accepted [0, {n_cores}) or -1")
    return g


# ----------------------------------------------------------------------------- checks


def check_tensor(name, t, ndim, doc, dtype, device, contiguous=True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {doc}, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(
            f"{name}: dtype {t.dtype} differs from x's {dtype}; the float tensors must share one "
            f"of {', '.join(str(d) for d in FLOAT_DTYPES)}"
        )
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, x is on {device}; all tensors must share a device")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got strides {t.stride()}; call .contiguous()")


def check_ids(name, ids, T, device) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in INT_DTYPES:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name}: expected an int32/int64 tensor (T,), got {got}")
    if ids.shape != (T,):
        raise ValueError(f"{name}: expected shape ({T},) (one id per token), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name}: on {ids.device}, x is on {device}; all tensors must share a device")


def check_io(x: torch.Tensor, y: torch.Tensor) -> None:
    """x: (T, d_in) contiguous float; y: (T, d_out) same dtype, rows may be strided."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor (T, d_in), got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: dtype {x.dtype}, accepted {', '.join(str(d) for d in FLOAT_DTYPES)}")
    check_tensor("x", x, 2, "(T, d_in)", x.dtype, x.device)
    check_tensor("y", y, 2, "(T, d_out)", x.dtype, x.device, contiguous=False)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} rows (T, d_out) like x, got {tuple(y.shape)}")
    if y.stride(1) != 1 or (x.shape[0] > 1 and y.stride(0) < y.shape[1]):
        raise ValueError(f"y: needs unit column stride and non-overlapping rows, got strides {y.stride()}")


# ----------------------------------------------------------------------------- torch path

Core = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def use_padded(g: BankGroups) -> bool:
    """One bmm over padded groups costs ~9 torch ops whatever the number of groups G; the
    per-group loop costs ~2G + 3. Python overhead, not flops, is the cost at decode sizes, so
    pad once G >= 3 unless padding would more than double the rows (skewed groups). With many
    groups (dense adapters drawn from a large pool: 43 adapters over 64 tokens) even 4x the rows
    beats 2G small mm calls (measured 0.28 -> 0.5 of base throughput at batch 64)."""
    G = len(g.clusters)
    return G >= 3 and G * g.pad_size <= (4 if G >= 16 else 2) * g.n_adapted


def pad_all_groups(g: BankGroups, n_groups: int) -> bool:
    """Whether the padded layout spans all n_groups groups, absent ones as pads: when at least
    half are present, the extra pad rows cost less than gathering the weights of the present
    ones on every call (a copy, then read again: ~0.8 ms of a ~12 ms decode step at K=16 with
    15 of the 16 clusters present, batch 64, hidden 256)."""
    return 2 * len(g.clusters) >= n_groups


def row_cores(g: BankGroups, n_groups: int) -> torch.Tensor:
    """(rows,) the core id of each row `lora_torch` computes over weights of n_groups groups, in
    its order: the padded layout (-1 for a pad) or the adapted tokens sorted by cluster. A caller
    that gathers its cores once in this order (zero for pads) can pass `pads_zero=True`."""
    if use_padded(g):
        _, core_idx, pad, _ = g.padded(n_groups if pad_all_groups(g, n_groups) else None)
        return core_idx.masked_fill(pad.squeeze(1), -1)
    return g.core_idx


CORE_ZS_MIN_RANK = 20
"""From this rank up a full core runs as z (1, r) @ Sᵀ, below it as S @ z (r, 1): MKL's batched
small GEMM (torch 2.13 CPU, 1 and 2 threads) switches kernels at r = 20, and each form is 1.5-4x
slower on the other side (144 rows: r=16 40 vs 64 us, r=24 58 vs 21 us, r=48 204 vs 38 us)."""


def core_layout(S: torch.Tensor) -> torch.Tensor:
    """Full cores S (..., r, r) as `apply_cores` reads them (transposed from r = 20 up); a
    diagonal (..., r) is returned as it is."""
    return S.transpose(-1, -2) if S.dim() >= 3 and S.shape[-1] >= CORE_ZS_MIN_RANK else S


def apply_cores(z: torch.Tensor, cores: torch.Tensor, shared: bool = False) -> torch.Tensor:
    """(n, r) row i times its own core: z[i] * cores[i] for diagonal cores (n, r), else
    S_i @ z[i] with cores (n, r, r) in `core_layout` (each matrix contiguous, any batch stride).
    shared: every row has the same core (one adapter in the batch), applied as one mm."""
    full = cores.dim() == 3
    zs = full and cores.shape[-1] >= CORE_ZS_MIN_RANK  # cores hold Sᵀ
    if shared:
        s = cores[0]  # (r, r) or (r,)
        return (z @ s if zs else z @ s.T) if full else z * s
    if not full:
        return z * cores
    if zs:
        return torch.bmm(z.unsqueeze(1), cores).squeeze(1)
    return torch.bmm(cores, z.unsqueeze(2)).squeeze(2)


def lora_torch(x, V, U, y, g: BankGroups, core: Core | None = None, *, pads_zero: bool = False) -> None:
    """y[t] += core(x[t] @ V[k], core_id) @ U[k].T for the adapted tokens t of each group k.
    V: (G, d_in, r), U: (G, d_out, r), any strides (U as a transposed view of a contiguous
    (G, r, d_out) expands ~2x faster); core(z (n, r), core_ids (n,)) -> (n, r) or None, with
    rows in `row_cores(g, G)` order; pads_zero: core already returns zero rows for the pads."""
    if g.n_adapted == 0:
        return
    if use_padded(g):
        every = pad_all_groups(g, V.shape[0])  # lay out all K groups: ids == arange(K), no gather
        tok, core_idx, pad, ids = g.padded(V.shape[0] if every else None)
        G, m = ids.numel(), g.pad_size
        xp = x.index_select(0, tok).view(G, m, -1)  # (G, m, d_in)
        z = torch.bmm(xp, V if every else _gather(V, ids)).view(G * m, -1)  # (G*m, r)
        h = z if core is None else core(z, core_idx)  # (G*m, r)
        if not pads_zero:
            h = h.masked_fill_(pad, 0.0)
        Ug = U if every else _gather(U, ids)  # (G, d_out, r)
        out = torch.bmm(h.view(G, m, -1), Ug.transpose(1, 2))  # (G, m, d_out)
        y.index_add_(0, tok, out.view(G * m, -1))
        return
    if core is None and not g.identity and len(g.clusters) == 1 and x.is_cpu and 2 * g.n_adapted >= g.n_tokens:
        # one adapter over most of the batch (a verifier's scoring round): every row through it,
        # the other rows' z zeroed, beats a gather and an index_add_ (~1 us a row at d_out 768)
        k = g.clusters[0]
        z = _mm(x, V[k]).masked_fill_(g.unadapted(), 0.0)  # (T, r)
        y.addmm_(z, U[k].T)
        return
    xs = x if g.identity else x.index_select(0, g.token_idx)  # (n, d_in)
    z = _shrink(xs, V, g)  # (n, r)
    _expand(z if core is None else core(z, g.core_idx), U, y, g)


def _gather(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """t[ids] along dim 0, copying in t's memory order: a strided index_select of a transposed
    view (dense lora_A) is ~5x slower than gathering the contiguous tensor and transposing."""
    if t.is_contiguous() or not t.transpose(1, 2).is_contiguous():
        return t.index_select(0, ids)
    return t.transpose(1, 2).index_select(0, ids).transpose(1, 2)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a. With b row-major (d, r) and 1 < r < 16, MKL's sgemm is ~3x slower than
    the same product transposed (torch 2.13 CPU: 300 vs 100 us at d=4096, r=8, T=64). Batched
    (bmm) products have no such consistent rule across shapes, so only mm takes this detour."""
    if a.is_cpu and 1 < b.shape[-1] < 16 and b.stride(-1) == 1:
        return (b.mT @ a.mT).mT
    return a @ b


def _shrink(xs: torch.Tensor, V: torch.Tensor, g: BankGroups) -> torch.Tensor:
    """(n, r): each group's row block of xs (n, d_in) times V[k] (d_in, r)."""
    if len(g.clusters) == 1:
        return _mm(xs, V[g.clusters[0]])
    return torch.cat([_mm(xs[b:e], V[k]) for k, (b, e) in zip(g.clusters, g.bounds)])


def _expand(h: torch.Tensor, U: torch.Tensor, y: torch.Tensor, g: BankGroups) -> None:
    """y[token_idx] += each group's row block of h (n, r) times U[k].T (r, d_out)."""
    if g.identity:  # rows already in order: accumulate straight into y, no temporary
        for k, (b, e) in zip(g.clusters, g.bounds):
            y[b:e].addmm_(h[b:e], U[k].T)
        return
    if len(g.clusters) == 1:
        out = h @ U[g.clusters[0]].T  # (n, d_out)
    else:
        out = h.new_empty(h.shape[0], U.shape[1])  # (n, d_out)
        for k, (b, e) in zip(g.clusters, g.bounds):
            torch.mm(h[b:e], U[k].T, out=out[b:e])
    y.index_add_(0, g.token_idx, out)


# ----------------------------------------------------------------------------- benchmarks


def median_ms(fn, repeat: int = 30, warmup: int = 5) -> float:
    """Median time of one fn() call in ms, warm-up excluded (the first calls compile the Triton
    kernels). On CUDA, as triton.testing.do_bench: L2 flushed before each call and the call timed
    between two CUDA events, so a hot 60 MB L2 and host timer overhead do not flatter a 5 us kernel."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if cuda else None
    times = []
    for _ in range(repeat):
        if cuda:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbs(device: torch.device) -> float | None:
    """Device memory bandwidth as a copy of 1 GiB moves it (bytes read + written), CUDA only."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**29, dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src), repeat=10, warmup=2) * 1e-3) / 1e9


@dataclass
class BenchRow:
    """One timed path of a kernel benchmark, with the work it must do at least."""

    name: str
    ms: float
    bytes: int | None = None
    """minimal memory traffic of the op: every input read once, the output read and written"""
    flops: int | None = None


def matmul_same_flops(x: torch.Tensor, flops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, M): x (T, d_in) @ M (d_in, m) does `flops` (rounded to m a multiple of 8): a plain
    GEMM of the LoRA op's work, the yardstick of its efficiency."""
    T, d_in = x.shape
    m = max(8, round(flops / (2 * T * d_in) / 8) * 8)
    return x, torch.randn(d_in, m, device=x.device, dtype=x.dtype) / d_in**0.5


def reference_rows(x: torch.Tensor, W: torch.Tensor, lora_flops: int, ms, grouping) -> list[BenchRow]:
    """The comparators every kernel benchmark prints first: the base GEMM `x @ W.T`, a plain matmul
    of the LoRA path's FLOPs (what the kernel's work would cost as one dense GEMM), and the
    per-forward routing (`grouping()`)."""
    t, d_in = x.shape
    d_out, isz = W.shape[0], x.dtype.itemsize
    xm, M = matmul_same_flops(x, lora_flops)
    m = M.shape[1]
    return [BenchRow("base x @ W.T", ms(lambda: x @ W.T), isz * (t + d_out) * d_in + isz * t * d_out, 2 * t * d_in * d_out),
            BenchRow(f"matmul of same FLOPs (m={m})", ms(lambda: xm @ M), isz * (t * d_in + d_in * m + t * m),
                     2 * t * d_in * m),
            BenchRow("group_by_cluster (1/forward)", ms(grouping))]


def report(title: str, rows: list[BenchRow], settings: dict, device: torch.device, json_path: str | None) -> None:
    """Print rows beside the first (the base GEMM) with achieved GB/s and TFLOP/s; optionally
    write them, the settings and the device's copy bandwidth as JSON."""
    peak = copy_gbs(device)
    print(title + (f" (device copy {peak:.0f} GB/s)" if peak else ""))
    print(f"  {'path':<30}{'ms':>9}{'vs ' + rows[0].name:>18}{'GB/s':>9}{'TFLOP/s':>9}")
    out = []
    for r in rows:
        gbs = r.bytes / (r.ms * 1e-3) / 1e9 if r.bytes else None
        tflops = r.flops / (r.ms * 1e-3) / 1e12 if r.flops else None
        cells = "".join(f"{v:>9.1f}" if v is not None else f"{'-':>9}" for v in (gbs, tflops))
        print(f"  {r.name:<30}{r.ms:>9.4f}{r.ms / rows[0].ms:>17.2f}x{cells}")
        out.append({"name": r.name, "ms": r.ms, "bytes": r.bytes, "flops": r.flops, "gb_s": gbs, "tflop_s": tflops})
    if json_path:
        import json

        name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        doc = {"title": title, "settings": settings, "device": name, "copy_gb_s": peak, "rows": out}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)


def bench_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-out", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeat", type=int, default=30, help="timed calls per path; the median is shown")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return p


def machine_line(device: torch.device) -> str:
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (
        f"machine: {platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}{gpu}"
    )
