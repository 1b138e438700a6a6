"""Per-forward adapter routing: the model's `LoraHook`, built from the tokens' adapters.

`AdapterRegistry.batch(uids)` maps each token to its dense row or its bank (cluster, core) and
builds a `LoraBatch` over the registry's `LoraTensors`; the model calls it after each fused linear,
and it adds every token's own delta in place: dense LoRA through `dense_lora` (Punica/S-LoRA's
gathered BGMV), bank entries as `U_k Σ_i V_kᵀ` (Brüel-Gabrielsson et al., ICML 2025) on one of
three layouts — the fused kernel (CUDA), a one-cluster basis folded into the base GEMM (CPU: the
model hands over `x V` as `extra`), or the routed torch path over several clusters (CPU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .kernels import bank_lora, dense_lora, group_by_cluster
from .kernels.bank_lora import bank_lora_routed, route_bank
from . import cpu_kernels
from .kernels.common import CORE_ZS_MIN_RANK, apply_cores
from .model import FUSED_GROUPS

BLOCK_EXPAND_MIN_ROWS = 64
"""rows from which a folded group's expand runs per module (below, one GEMM's fewer calls win)"""


@dataclass(frozen=True)
class LoraTensors:
    """The registry's adapter tensors as a forward reads them (references, never copies); the
    registry hands out a fresh one per batch (`AdapterRegistry.lora_tensors`)."""

    config: ModelConfig
    device: torch.device
    dense: Mapping[tuple[int, str], Sequence[torch.Tensor]]
    """(layer, module) -> (lora_A (cap, r, d_in), lora_B (cap, d_out, r)), indexed by dense row"""
    bank: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """fused-kernel layout: (layer, group) -> (U (K, d_out, R), V (K, d_in, R), S (n, R, R) or (n, R))"""
    folded: Mapping[tuple[int, str], tuple[torch.Tensor, int, int]]
    """one cluster folded into the base weight: (layer, group) -> (Uᵀ (R, d_out), R, j of `cores[R]`)"""
    folded_blocks: Mapping[tuple[int, str], list[tuple[slice, slice]]]
    """folded group of several modules -> per module (its columns of R, its columns of the output)"""
    grouped: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int, int]]
    """routed torch layout: (layer, group) -> (V (K, d_in, R), Uᵀ (K, R, d_out), R, j of `cores[R]`)"""
    cores: Mapping[int, torch.Tensor]
    """R -> every group's cores (J, n + 1, R, R) in `core_layout` or (J, n + 1, R); row n is zero"""
    num_clusters: int
    """K of the bank (0 without one)"""
    num_entries: int
    """n, the bank's entries (0 without one)"""


class LoraBatch:
    """Per-forward adapter routing; called by the model after each fused linear. The registry
    caches it while the batch's uids repeat, so decode steps reuse its groups and gathered cores.

    `dense_ids[t]` is token t's row in the dense stacks, `clusters[t]`/`cores[t]` its bank cluster
    and core index; -1 where the token has none of that kind."""

    def __init__(self, tensors: LoraTensors, dense_ids: list[int], clusters: list[int], cores: list[int]):
        t, dev = tensors, tensors.device
        self.tensors = t
        self._ids = (dense_ids, clusters, cores)
        self.dense = None
        if any(i >= 0 for i in dense_ids):
            ids = torch.tensor(dense_ids, dtype=torch.long, device=dev)
            self.dense = (ids, group_by_cluster(ids, ids))
        self.bank = self.route = None
        self.shared = len(set(cores)) == 1 and cores[0] >= 0
        """every token carries the same bank entry: the folded path applies its core as one mm"""
        self.cores: dict[tuple[int, str], torch.Tensor] = {}
        """(layer, group) -> its core of each row, (rows, R, R) in `core_layout` or (rows, R): one
        row per token (folded) or per row of the grouped path; zero for base tokens and pads"""
        if any(i >= 0 for i in cores):
            c = torch.tensor(clusters, dtype=torch.long, device=dev)
            a = torch.tensor(cores, dtype=torch.long, device=dev)
            if t.bank:
                self.bank = (c, a, group_by_cluster(c, a))
            rows = a
            if t.grouped:
                self.route = route_bank(c, a, t.num_clusters)
                rows = self.route.rows
            if t.cores:  # one gather per rank serves every layer (-1 -> the appended zero core)
                idx = torch.where(rows >= 0, rows, t.num_entries)
                by_rank = {rg: s.index_select(1, idx) for rg, s in t.cores.items()}  # (J, rows, R, R)
                for key, (*_, rg, j) in (t.folded | t.grouped).items():
                    self.cores[key] = by_rank[rg][j]
        self.cpu_kernels = False
        """the packed path sets this per forward: a folded bank's work through `cpu_kernels.bank_expand`"""
        self._folded_only = self.dense is None and self.bank is None and self.route is None
        """only folded groups' work: a group with a built `_expand` needs nothing else"""
        self._expand: dict[tuple[int, str], cpu_kernels.BankExpand] = {}
        """(layer, group) -> its folded expand with this batch's cores (`cpu_kernels.BankExpand`)"""
        cfg = t.config
        sizes = {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size, "o_proj": cfg.hidden_size,
                 "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}
        self._offsets = {}
        for modules in FUSED_GROUPS.values():
            off = 0
            for m in modules:
                self._offsets[m] = (off, sizes[m])
                off += sizes[m]

    def rows(self, rows: torch.Tensor) -> LoraBatch | None:
        """The routing of these rows of the batch, in their order (None when none carries an
        adapter): the model's last layer past its keys and values runs on the rows it keeps."""
        idx = rows.tolist()
        ids = [[col[i] for i in idx] for col in self._ids]
        if all(i < 0 for col in ids for i in col):
            return None
        return LoraBatch(self.tensors, *ids)

    def __call__(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor,
                 extra: torch.Tensor | None = None) -> None:
        if self._folded_only and self.cpu_kernels and extra is not None:  # a CPU decode step: one lookup, one call
            expand = self._expand.get((layer, group))
            if expand is not None:
                return expand(extra, y)
        t, key = self.tensors, (layer, group)
        st = self.cores.get(key)
        if st is not None and extra is not None:  # a folded bank: extra = x V
            ut = t.folded[key][0]
            if self.cpu_kernels and ut.dtype == st.dtype == torch.float32 and extra.dtype == y.dtype:
                expand = self._expand.get(key)
                if expand is None:
                    blocks = cpu_kernels.bank_blocks(t.folded_blocks.get(key), *ut.shape)
                    zs = st.dim() == 3 and st.shape[-1] >= CORE_ZS_MIN_RANK
                    expand = self._expand[key] = cpu_kernels.BankExpand(st, zs, ut, blocks)
                expand(extra, y)  # the lines below in one pass
                st = None
        if st is not None and extra is not None:
            ut = t.folded[key][0]
            h = apply_cores(extra if extra.dtype == ut.dtype else extra.float(), st, self.shared)  # (N, R)
            blocks = t.folded_blocks.get(key)
            same = h.dtype == y.dtype  # else the cores and Uᵀ are float32 (`load_bank`)
            if blocks is None or h.shape[0] < BLOCK_EXPAND_MIN_ROWS:
                y.addmm_(h, ut) if same else y.add_(h @ ut)  # (N, R) @ (R, d_out)
            else:  # one (N, r) @ (r, d_m) per module of the group: Uᵀ's zero blocks cost nothing
                for cols, out in blocks:
                    y[:, out].addmm_(h[:, cols], ut[cols, out]) if same else y[:, out].add_(h[:, cols] @ ut[cols, out])
        elif st is not None and self.route is not None:
            v, ut, _, _ = t.grouped[key]
            bank_lora_routed(x, v, ut, st, y, self.route)
        if self.bank is not None:
            fused = t.bank.get(key)
            if fused is not None:
                c, a, groups = self.bank
                bank_lora(x, fused[1], fused[2], fused[0], c, a, y, groups=groups)
        if self.dense is None:
            return
        ids, groups = self.dense
        for module in FUSED_GROUPS[group]:
            stacks = t.dense.get((layer, module))
            if stacks is not None:
                off, size = self._offsets[module]
                ys = y[:, off: off + size] if size != y.shape[1] else y  # (N, d_out) view
                dense_lora(x, stacks[0], stacks[1], ids, ys, groups=groups)
