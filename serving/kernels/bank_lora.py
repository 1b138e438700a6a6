"""Bank LoRA: the per-token LoRA update of adapters compressed into shared per-cluster bases.

Compress then Serve (Brüel-Gabrielsson et al., ICML 2025) stores the adapters of one module as
K cluster bases V_k (d_in, r), U_k (d_out, r) and one small core per adapter: S_a (r, r) for
JD-Full or its diagonal (r,) for JD-Diag. A token of adapter a in cluster c gets
y += ((x @ V_c) @ S_a.T) @ U_c.T.

The file has the four parts of every kernel file here: the Triton kernel (a fused, grouped
shrink -> core -> expand over tiles of tokens that share a basis; dense_lora launches it too),
the checked wrappers, a float64 reference, and a benchmark (`python -m serving.kernels.bank_lora`).
The torch path is `common.lora_torch`: grouped by cluster with as few torch ops as possible,
because at decode sizes Python overhead, not flops, is the cost. The engine's CPU path for a bank
of several clusters, `bank_lora_routed`, goes further: the routing and every layer's per-token
cores are built once per batch (and reused by decode steps that repeat it), and a decode-sized
call is then 5 torch ops whatever the number of clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.kernels.common import (
    BankGroups,
    apply_cores,
    bench_parser,
    core_layout,
    check_ids,
    check_io,
    check_tensor,
    group_by_cluster,
    lora_torch,
    machine_line,
    BenchRow,
    pad_all_groups,
    reference_rows,
    median_ms,
    report,
    resolve_groups,
    row_cores,
    use_padded,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the torch path needs none
    triton = None

CORE_NONE, CORE_DIAG, CORE_FULL = 0, 1, 2


def triton_available() -> bool:
    """True when triton imports (its kernels also need CUDA tensors or TRITON_INTERPRET=1)."""
    return triton is not None


# ----------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _lora_tile_kernel(
        x_ptr, v_ptr, s_ptr, u_ptr, y_ptr,
        tok_ptr, core_ptr, tile_group_ptr, tile_start_ptr, tile_len_ptr,
        d_in, d_out, r, cols_per_program,
        stride_xm, stride_xk,
        stride_vg, stride_vk, stride_vr,
        stride_sn, stride_si, stride_sj,
        stride_ug, stride_un, stride_ur,
        stride_ym, stride_yn,
        CORE_MODE: tl.constexpr,  # 0: none (dense LoRA), 1: diagonal core, 2: full core
        DOT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies bit patterns (triton#11584)
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
        BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_R: tl.constexpr,
    ):  # fmt: skip
        # One program = one tile of <= BLOCK_SIZE_M tokens sharing a basis (cluster, or adapter
        # for dense LoRA) x one chunk of d_out columns. Sharing the basis is what lets the
        # shrink and expand be tl.dot on a token tile instead of per-token GEMVs. The shrink is
        # recomputed by each d_out chunk: it is r-wide and cheap, and cols_per_program trades
        # that redundancy against parallelism; the (M, r) intermediate never leaves registers.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        group = tl.load(tile_group_ptr + pid_m).to(tl.int64)
        start = tl.load(tile_start_ptr + pid_m)
        n_rows = tl.load(tile_len_ptr + pid_m)
        offs_m = tl.arange(0, BLOCK_SIZE_M)
        mask_m = offs_m < n_rows
        tok = tl.load(tok_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)  # (M,)
        offs_r = tl.arange(0, BLOCK_SIZE_R)
        mask_r = offs_r < r  # r is padded to a power of two >= 16, the smallest tl.dot size
        offs_k = tl.arange(0, BLOCK_SIZE_K)

        # shrink: z = x[tok] @ V_g, fp32 accumulator
        z = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_R), dtype=tl.float32)  # (M, R)
        for k0 in range(0, d_in, BLOCK_SIZE_K):
            offs_k_cur = k0 + offs_k
            mask_k = offs_k_cur < d_in
            x_tile = tl.load(
                x_ptr + tok[:, None] * stride_xm + offs_k_cur[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )  # (M, K)
            v_tile = tl.load(
                v_ptr + group * stride_vg + offs_k_cur[:, None] * stride_vk + offs_r[None, :] * stride_vr,
                mask=mask_k[:, None] & mask_r[None, :], other=0.0,
            )  # (K, R)
            if DOT_IN_FP32:  # bf16 -> fp32 is exact: same products as the GPU's bf16 dot
                x_tile = x_tile.to(tl.float32)
                v_tile = v_tile.to(tl.float32)
            z = tl.dot(x_tile, v_tile, z, input_precision=DOT_PRECISION)

        # core: every token has its own, so this is elementwise work, not a tl.dot
        if CORE_MODE != 0:
            core = tl.load(core_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)  # (M,)
            s_rows = s_ptr + core[:, None] * stride_sn  # (M, 1)
            mask_s = mask_m[:, None] & mask_r[None, :]
            if CORE_MODE == 1:
                s_diag = tl.load(s_rows + offs_r[None, :] * stride_si, mask=mask_s, other=0.0)  # (M, R)
                z = z * s_diag.to(tl.float32)
            else:
                # one core row per step keeps registers at (M, R) instead of an (M, R, R) tile
                h = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_R), dtype=tl.float32)  # (M, R)
                for i in range(0, r):
                    s_row = tl.load(
                        s_rows + i * stride_si + offs_r[None, :] * stride_sj, mask=mask_s, other=0.0
                    )  # (M, R): row i of each token's core
                    h_i = tl.sum(z * s_row.to(tl.float32), axis=1)  # (M,)
                    h = tl.where(offs_r[None, :] == i, h_i[:, None], h)
                z = h
        # the expand runs on tensor cores in the weights' dtype (peft also rounds here)
        h_in = z.to(u_ptr.dtype.element_ty)  # (M, R)
        if DOT_IN_FP32:
            h_in = h_in.to(tl.float32)

        # expand: y[tok, n] += h @ U_g[n].T over this program's column chunk
        offs_n = tl.arange(0, BLOCK_SIZE_N)
        n_begin = pid_n * cols_per_program
        n_end = tl.minimum(n_begin + cols_per_program, d_out)
        for n0 in range(n_begin, n_end, BLOCK_SIZE_N):
            offs_n_cur = n0 + offs_n
            mask_n = offs_n_cur < n_end
            u_tile = tl.load(
                u_ptr + group * stride_ug + offs_r[:, None] * stride_ur + offs_n_cur[None, :] * stride_un,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0,
            )  # (R, N)
            if DOT_IN_FP32:
                u_tile = u_tile.to(tl.float32)
            out = tl.dot(h_in, u_tile, input_precision=DOT_PRECISION)  # (M, N) fp32
            # tokens are unique across tiles and columns across programs: no atomics needed
            y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n_cur[None, :] * stride_yn
            mask_y = mask_m[:, None] & mask_n[None, :]
            y_tile = tl.load(y_ptrs, mask=mask_y, other=0.0)
            tl.store(y_ptrs, (y_tile.to(tl.float32) + out).to(y_ptr.dtype.element_ty), mask=mask_y)


def _interpreted() -> bool:
    return type(_lora_tile_kernel).__name__ == "InterpretedFunction"


def check_triton_runnable(x: torch.Tensor) -> None:
    if triton is None:
        raise ImportError("the Triton path needs triton: pip install triton")
    if not x.is_cuda and not _interpreted():
        raise ValueError(
            f"x: on {x.device}; the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before serving.kernels is imported"
        )


def launch_tiles(x, V, S, U, y, groups: BankGroups, core_mode: int) -> None:
    """Run the tile kernel. V: (G, d_in, r), U: (G, d_out, r), S: (n, r, r), (n, r) or None;
    any strides (dense LoRA passes lora_A transposed)."""
    d_in, d_out, r = x.shape[1], y.shape[1], V.shape[2]
    block_m = 16  # decode-sized groups; tl.dot needs >= 16
    tiles = groups.tiles(block_m)  # (3, n_tiles)
    # ~512 columns per program: enough programs to fill a GPU at decode batch sizes while
    # recomputing the r-wide shrink at most d_out / 512 times
    cols = 512
    s_arg = S if S is not None else V
    s_strides = (0, 0, 0) if S is None else (tuple(S.stride()) + (0,))[:3]
    grid = (tiles.shape[1], triton.cdiv(d_out, cols))
    _lora_tile_kernel[grid](
        x, V, s_arg, U, y,
        groups.token_idx, groups.core_idx, tiles[0], tiles[1], tiles[2],
        d_in, d_out, r, cols,
        x.stride(0), x.stride(1),
        V.stride(0), V.stride(1), V.stride(2),
        *s_strides,
        U.stride(0), U.stride(1), U.stride(2),
        y.stride(0), y.stride(1),
        CORE_MODE=core_mode,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_IN_FP32=x.dtype == torch.bfloat16 and _interpreted(),
        BLOCK_SIZE_M=block_m, BLOCK_SIZE_K=64, BLOCK_SIZE_N=64,
        BLOCK_SIZE_R=max(16, triton.next_power_of_2(r)),
    )  # fmt: skip


# ----------------------------------------------------------------------------- wrappers


def _check_bank(x, V, S, U, cluster_ids, core_ids, y) -> bool:
    """Validate the arguments of every bank_lora implementation; True for a diagonal core."""
    check_io(x, y)
    (T, d_in), d_out = x.shape, y.shape[1]
    check_tensor("V", V, 3, "(K, d_in, r)", x.dtype, x.device)
    K, r = V.shape[0], V.shape[2]
    if V.shape[1] != d_in:
        raise ValueError(f"V: expected (K, {d_in}, r) to match x's d_in, got {tuple(V.shape)}")
    check_tensor("U", U, 3, "(K, d_out, r)", x.dtype, x.device)
    if U.shape != (K, d_out, r):
        raise ValueError(f"U: expected ({K}, {d_out}, {r}) (K, d_out, r), got {tuple(U.shape)}")
    if not isinstance(S, torch.Tensor) or S.dim() not in (2, 3):
        got = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"S: expected (n, r, r) full or (n, r) diagonal cores, got {got}")
    check_tensor("S", S, S.dim(), "(n, r, r) or (n, r)", x.dtype, x.device)
    if S.shape[1:] not in ((r, r), (r,)):
        raise ValueError(f"S: expected (n, {r}, {r}) or (n, {r}) for rank {r}, got {tuple(S.shape)}")
    check_ids("cluster_ids", cluster_ids, T, x.device)
    check_ids("core_ids", core_ids, T, x.device)
    return S.dim() == 2


def _core_fn(S: torch.Tensor, single_core: int | None, diag: bool):
    """core(z (n, r), core_ids (n,)) -> (n, r): z * S[a] (diag) or S[a] @ z (full), per token."""
    if single_core is not None:  # one adapter in the batch: no gather, one mul or mm
        s = S[single_core]  # (r,) or (r, r)
        return (lambda z, _: z.mul_(s)) if diag else (lambda z, _: z @ s.T)
    if diag:
        return lambda z, a: z.mul_(S.index_select(0, a))
    return lambda z, a: torch.bmm(S.index_select(0, a), z.unsqueeze(2)).squeeze(2)


def bank_lora_torch(x, V, S, U, cluster_ids, core_ids, y, *, groups=None):
    """Torch path of `bank_lora`: shrink and expand grouped by cluster, cores in one bmm."""
    diag = _check_bank(x, V, S, U, cluster_ids, core_ids, y)
    g = resolve_groups(groups, cluster_ids, core_ids, V.shape[0], S.shape[0], ("cluster_ids", "core_ids"))
    lora_torch(x, V, U, y, g, _core_fn(S, g.single_core, diag))
    return y


@dataclass
class BankRoute:
    """One batch's routing for the routed torch path (the engine's CPU bank), built once and
    reused by every layer, and by the decode steps that repeat the batch."""

    groups: BankGroups
    rows: torch.Tensor
    """(rows,) core id of each row the path computes, -1 for a pad: gather every layer's cores
    in this order once (a zero core for -1) and pass them to `bank_lora_routed`"""
    padded_tok: torch.Tensor | None
    """(K*m,) token of each row when every cluster is padded to m rows, else None"""


def route_bank(cluster_ids: torch.Tensor, core_ids: torch.Tensor, n_clusters: int) -> BankRoute:
    """Route a batch over a bank of n_clusters clusters (one host sync, like group_by_cluster)."""
    g = group_by_cluster(cluster_ids, core_ids)
    padded = use_padded(g) and pad_all_groups(g, n_clusters)
    return BankRoute(g, row_cores(g, n_clusters), g.padded(n_clusters)[0] if padded else None)


def bank_lora_routed(x, V, Ut, cores, y, route: BankRoute):
    """The torch path with the routing and the cores gathered once per batch. Unchecked: the
    caller (the adapter registry) built every index itself.

    for t with core_ids[t] >= 0:  y[t] += apply_cores(x[t] @ V[c[t]], core of t) @ Ut[c[t]]

    V (K, d_in, r), Ut (K, r, d_out) (U transposed, contiguous), cores (rows, r, r) in
    `core_layout` or (rows, r) diagonal, in `route.rows` order and zero for pads. At decode
    sizes every cluster is padded to m rows, so a call is 5 torch ops whatever K (a gather of x,
    shrink, cores, expand as bmm over all K bases as they are, and a scatter into y) instead of
    a loop over clusters; other batches take `lora_torch`.
    """
    tok = route.padded_tok
    if tok is None:  # the loop over clusters, or few clusters padded with their bases gathered
        shared = route.groups.single_core is not None  # one adapter: one cluster, the loop
        core = lambda z, _: apply_cores(z, cores, shared)  # noqa: E731
        lora_torch(x, V, Ut.transpose(1, 2), y, route.groups, core, pads_zero=True)
        return y
    K, rows = V.shape[0], tok.numel()
    z = torch.bmm(x.index_select(0, tok).view(K, rows // K, -1), V)  # (K, m, r)
    h = apply_cores(z.view(rows, -1), cores).view(K, rows // K, -1)  # (K, m, r)
    y.index_add_(0, tok, torch.bmm(h, Ut).view(rows, -1))  # (K*m, d_out); pads add zeros
    return y


def bank_lora_triton(x, V, S, U, cluster_ids, core_ids, y, *, groups=None):
    """Triton path of `bank_lora` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    diag = _check_bank(x, V, S, U, cluster_ids, core_ids, y)
    check_triton_runnable(x)
    g = resolve_groups(groups, cluster_ids, core_ids, V.shape[0], S.shape[0], ("cluster_ids", "core_ids"))
    if g.n_adapted:
        launch_tiles(x, V, S, U, y, g, CORE_DIAG if diag else CORE_FULL)
    return y


def bank_lora_ref(x, V, S, U, cluster_ids, core_ids, y, *, groups=None):
    """Reference: per-token gathers and einsums in float64. `groups` is ignored."""
    diag = _check_bank(x, V, S, U, cluster_ids, core_ids, y)
    tok = torch.nonzero(core_ids >= 0).squeeze(1)  # (n,)
    c, a = cluster_ids[tok].long(), core_ids[tok].long()  # (n,)
    z = torch.einsum("nd,ndr->nr", x[tok].double(), V[c].double())  # (n, r)
    h = z * S[a].double() if diag else torch.einsum("nij,nj->ni", S[a].double(), z)  # (n, r)
    out = torch.einsum("nr,nor->no", h, U[c].double())  # (n, d_out)
    y[tok] = (y[tok].double() + out).to(y.dtype)
    return y


def dispatch_bank_lora(x: torch.Tensor):
    """Triton on CUDA when triton imports, else the torch path."""
    return bank_lora_triton if x.is_cuda and triton_available() else bank_lora_torch


def bank_lora(x, V, S, U, cluster_ids, core_ids, y, *, groups: BankGroups | None = None):
    """Add the bank LoRA update to y in place and return y.

    for t with core_ids[t] >= 0:  y[t] += ((x[t] @ V[c[t]]) @ S[a[t]].T) @ U[c[t]].T
    (c = cluster_ids, a = core_ids; a (n, r) diagonal S multiplies instead: (x[t] @ V[c]) * S[a]).

    x (T, d_in), V (K, d_in, r), U (K, d_out, r), S (n, r, r) or (n, r) share a float dtype and
    are contiguous; y (T, d_out) may be a column slice of a wider tensor. Pass
    `groups=group_by_cluster(cluster_ids, core_ids)`, built once per forward, to every layer.
    """
    return dispatch_bank_lora(x)(x, V, S, U, cluster_ids, core_ids, y, groups=groups)


# ----------------------------------------------------------------------------- benchmark


def _bench() -> None:
    p = bench_parser("Time bank_lora's Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) and torch "
                     "path against a base x @ W.T and a plain matmul of the same FLOPs.")
    p.add_argument("--clusters", type=int, default=1)
    p.add_argument("--diag", action="store_true", help="JD-Diag cores (default: JD-Full)")
    a = p.parse_args()
    dev, dtype, T, r = torch.device(a.device), getattr(torch, a.dtype), a.tokens, a.rank
    torch.manual_seed(0)
    x = torch.randn(T, a.d_in, device=dev, dtype=dtype)
    W = torch.randn(a.d_out, a.d_in, device=dev, dtype=dtype) / a.d_in**0.5
    V = torch.randn(a.clusters, a.d_in, r, device=dev, dtype=dtype) / a.d_in**0.5
    U = torch.randn(a.clusters, a.d_out, r, device=dev, dtype=dtype) / r**0.5
    S = torch.randn((a.adapters, r) if a.diag else (a.adapters, r, r), device=dev, dtype=dtype)
    S = S if a.diag else S / r**0.5  # keeps h = S @ z at the scale of z
    cluster_of = torch.randint(a.clusters, (a.adapters,), device=dev)
    core_ids = torch.randint(a.adapters, (T,), device=dev)
    cluster_ids = cluster_of[core_ids]
    y0 = x @ W.T
    groups = group_by_cluster(cluster_ids, core_ids)
    args = (x, V, S, U, cluster_ids, core_ids)
    paths = [("torch path", bank_lora_torch)]
    if triton_available() and (dev.type == "cuda" or _interpreted()):
        paths.insert(0, ("triton", bank_lora_triton))
    want = bank_lora_ref(*args, y0.clone())
    for _, fn in paths:  # correctness first
        torch.testing.assert_close(fn(*args, y0.clone(), groups=groups), want, atol=5e-2, rtol=5e-2)
    # the engine's CPU path: route and cores built once per batch, as the adapter registry does
    route = route_bank(cluster_ids, core_ids, a.clusters)
    cores = core_layout(torch.cat([S, torch.zeros_like(S[:1])])).contiguous()
    cores = cores.index_select(0, torch.where(route.rows >= 0, route.rows, a.adapters))
    Ut = U.transpose(1, 2).contiguous()
    routed = lambda y: bank_lora_routed(x, V, Ut, cores, y, route)  # noqa: E731
    torch.testing.assert_close(routed(y0.clone()), want, atol=5e-2, rtol=5e-2)
    distinct, G = core_ids.unique().numel(), len(groups.clusters)
    print(machine_line(dev))
    print(f"settings: T={T} d_in={a.d_in} d_out={a.d_out} r={r} K={a.clusters} "
          f"adapters={a.adapters} {'diag' if a.diag else 'full'} cores {a.dtype}; "
          f"{G} clusters and {distinct} adapters present, torch path "
          f"{'pads groups for bmm' if use_padded(groups) else 'loops over groups'}")
    isz, s_size = dtype.itemsize, r if a.diag else r * r
    lora_bytes = isz * (T * a.d_in + 2 * T * a.d_out + G * (a.d_in + a.d_out) * r + distinct * s_size)
    lora_flops = 2 * T * (a.d_in * r + s_size + r * a.d_out)
    ms = lambda fn: median_ms(fn, repeat=a.repeat)  # noqa: E731
    y = y0.clone()
    rows = reference_rows(x, W, lora_flops, ms, lambda: group_by_cluster(cluster_ids, core_ids)) + [
        BenchRow(name, ms(lambda fn=fn: fn(*args, y, groups=groups)), lora_bytes, lora_flops) for name, fn in paths]
    rows.append(BenchRow("routed torch (route prebuilt)", ms(lambda: routed(y)), lora_bytes, lora_flops))
    settings = {**vars(a), "clusters_present": G, "adapters_present": distinct}
    report("bank_lora, one layer call (groups prebuilt):", rows, settings, dev, a.json)


if __name__ == "__main__":
    _bench()
