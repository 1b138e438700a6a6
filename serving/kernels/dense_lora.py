"""Dense LoRA: the per-token update of uncompressed adapters, each token picking its own.

The multi-adapter batching of Punica (Chen et al., 2023: BGMV/SGMV) and S-LoRA (Sheng et al.,
2023): every token t of a batch adds (x[t] @ lora_A[i].T) @ lora_B[i].T for its adapter i.

Parts, as in every kernel file here: the Triton kernel is the grouped tile kernel of
bank_lora launched without a core (SGMV-style: tokens sorted by adapter, one tile of tokens
sharing an adapter per program row; a batch where every adapter differs degrades to BGMV, one
token per tile); then the checked wrappers, the torch path the engine runs on CPU, a float64
reference, and a benchmark (`python -m serving.kernels.dense_lora --help`).
"""

from __future__ import annotations

import torch

from serving.kernels.bank_lora import CORE_NONE, _interpreted, check_triton_runnable, launch_tiles, triton_available
from serving.kernels.common import (
    BankGroups,
    bench_parser,
    check_ids,
    check_io,
    check_tensor,
    group_by_cluster,
    lora_torch,
    machine_line,
    BenchRow,
    reference_rows,
    median_ms,
    report,
    resolve_groups,
    use_padded,
)


def _check_dense(x, lora_A, lora_B, adapter_ids, y) -> None:
    """Validate the arguments of every dense_lora implementation."""
    check_io(x, y)
    (T, d_in), d_out = x.shape, y.shape[1]
    check_tensor("lora_A", lora_A, 3, "(n, r, d_in)", x.dtype, x.device)
    n, r = lora_A.shape[0], lora_A.shape[1]
    if lora_A.shape[2] != d_in:
        raise ValueError(f"lora_A: expected (n, r, {d_in}) to match x's d_in, got {tuple(lora_A.shape)}")
    check_tensor("lora_B", lora_B, 3, "(n, d_out, r)", x.dtype, x.device)
    if lora_B.shape != (n, d_out, r):
        raise ValueError(f"lora_B: expected ({n}, {d_out}, {r}) (n, d_out, r), got {tuple(lora_B.shape)}")
    check_ids("adapter_ids", adapter_ids, T, x.device)


def _groups(groups, adapter_ids, n) -> BankGroups:
    return resolve_groups(groups, adapter_ids, adapter_ids, n, n, ("adapter_ids", "adapter_ids"))


def dense_lora_torch(x, lora_A, lora_B, adapter_ids, y, *, groups=None):
    """Torch path of `dense_lora`: an mm pair per adapter (SGMV-like) for a few adapters; for
    many, one gather + bmm pair over adapters padded to one size (BGMV-like when all differ)."""
    _check_dense(x, lora_A, lora_B, adapter_ids, y)
    g = _groups(groups, adapter_ids, lora_A.shape[0])
    lora_torch(x, lora_A.transpose(1, 2), lora_B, y, g)
    return y


def dense_lora_triton(x, lora_A, lora_B, adapter_ids, y, *, groups=None):
    """Triton path of `dense_lora` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check_dense(x, lora_A, lora_B, adapter_ids, y)
    check_triton_runnable(x)
    g = _groups(groups, adapter_ids, lora_A.shape[0])
    if g.n_adapted:
        # lora_A viewed as per-adapter (d_in, r) bases; the kernel reads any strides
        launch_tiles(x, lora_A.transpose(1, 2), None, lora_B, y, g, CORE_NONE)
    return y


def dense_lora_ref(x, lora_A, lora_B, adapter_ids, y, *, groups=None):
    """Reference: per-token gathers and einsums in float64. `groups` is ignored."""
    _check_dense(x, lora_A, lora_B, adapter_ids, y)
    tok = torch.nonzero(adapter_ids >= 0).squeeze(1)  # (n,)
    i = adapter_ids[tok].long()  # (n,)
    z = torch.einsum("nd,nrd->nr", x[tok].double(), lora_A[i].double())  # (n, r)
    out = torch.einsum("nr,nor->no", z, lora_B[i].double())  # (n, d_out)
    y[tok] = (y[tok].double() + out).to(y.dtype)
    return y


def dispatch_dense_lora(x: torch.Tensor):
    """Triton on CUDA when triton imports, else the torch path."""
    return dense_lora_triton if x.is_cuda and triton_available() else dense_lora_torch


def dense_lora(x, lora_A, lora_B, adapter_ids, y, *, groups: BankGroups | None = None):
    """Add each token's LoRA update to y in place and return y.

    for t with adapter_ids[t] >= 0:  y[t] += (x[t] @ lora_A[i[t]].T) @ lora_B[i[t]].T   (i = adapter_ids)

    x (T, d_in), lora_A (n, r, d_in), lora_B (n, d_out, r) share a float dtype and are
    contiguous; `scaling` is folded into lora_B and smaller ranks are zero-padded to r by the
    caller. y (T, d_out) may be a column slice of a wider tensor. Pass
    `groups=group_by_cluster(adapter_ids, adapter_ids)`, built once per forward, to every layer.
    """
    return dispatch_dense_lora(x)(x, lora_A, lora_B, adapter_ids, y, groups=groups)


def _bench() -> None:
    p = bench_parser("Time dense_lora's Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) and torch "
                     "path against a base x @ W.T and a plain matmul of the same FLOPs.")
    p.add_argument("--distinct", type=int, default=None, help="adapters in the batch (default: random)")
    a = p.parse_args()
    dev, dtype, T, r = torch.device(a.device), getattr(torch, a.dtype), a.tokens, a.rank
    torch.manual_seed(0)
    x = torch.randn(T, a.d_in, device=dev, dtype=dtype)
    W = torch.randn(a.d_out, a.d_in, device=dev, dtype=dtype) / a.d_in**0.5
    lora_A = torch.randn(a.adapters, r, a.d_in, device=dev, dtype=dtype) / a.d_in**0.5
    lora_B = torch.randn(a.adapters, a.d_out, r, device=dev, dtype=dtype) / r**0.5
    pool = a.distinct if a.distinct is not None else a.adapters
    adapter_ids = torch.randperm(a.adapters, device=dev)[:pool][torch.randint(pool, (T,), device=dev)]
    y0 = x @ W.T
    groups = group_by_cluster(adapter_ids, adapter_ids)
    args = (x, lora_A, lora_B, adapter_ids)
    paths = [("torch path", dense_lora_torch)]
    if triton_available() and (dev.type == "cuda" or _interpreted()):
        paths.insert(0, ("triton", dense_lora_triton))
    want = dense_lora_ref(*args, y0.clone())
    for _, fn in paths:  # correctness first
        torch.testing.assert_close(fn(*args, y0.clone(), groups=groups), want, atol=5e-2, rtol=5e-2)
    G = len(groups.clusters)
    print(machine_line(dev))
    print(f"settings: T={T} d_in={a.d_in} d_out={a.d_out} r={r} adapters={a.adapters} {a.dtype}; "
          f"{G} distinct in the batch, torch path uses "
          f"{'pads groups for bmm' if use_padded(groups) else 'loops over groups'}")
    isz = dtype.itemsize
    lora_bytes = isz * (T * a.d_in + 2 * T * a.d_out + G * (a.d_in + a.d_out) * r)
    lora_flops = 2 * T * r * (a.d_in + a.d_out)
    ms = lambda fn: median_ms(fn, repeat=a.repeat)  # noqa: E731
    y = y0.clone()
    rows = reference_rows(x, W, lora_flops, ms, lambda: group_by_cluster(adapter_ids, adapter_ids)) + [
        BenchRow(name, ms(lambda fn=fn: fn(*args, y, groups=groups)), lora_bytes, lora_flops) for name, fn in paths]
    report("dense_lora, one layer call (groups prebuilt):", rows, {**vars(a), "adapters_present": G}, dev, a.json)


if __name__ == "__main__":
    _bench()
