"""The adapter registry: dense PEFT adapters and bank entries side by side, chosen per token.

Every adapter gets a uid that is never reused (the KV cache keys blocks by uid, so a reloaded name
can never hit a stale block). Dense adapters live as zero-padded stacks per target module
(`lora_A` (cap, r, d_in), `lora_B` (cap, d_out, r), scaling folded in; an adapter is one row of
them); bank entries point at a cluster's shared basis and their own core (`U_k Σ_i V_kᵀ`,
Brüel-Gabrielsson et al., ICML 2025).

A padded stack costs `cap · r` rows however small most adapters are, so one high-rank adapter
would multiply the memory of every target: `max_lora_rank` refuses it up front (vLLM's name), and
unloading shrinks the stacks back to what the resident adapters need (see `AdapterRegistry`).
A `LoraBatch` (`lora_batch.py`) is built once per forward from the tokens' uids over the
registry's `lora_tensors()` and is the model's `LoraHook`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compression.bank import Bank
from compression.peft_io import LoraAdapter, load_adapter, module_name

from .config import ModelConfig
from .kernels.common import core_layout
from .lora_batch import LoraBatch, LoraTensors
from .model import FUSED_GROUPS

BASE = -1
"""uid of the base model (no adapter)"""

DEFAULT_MAX_LORA_RANK = 64
"""The server's default `--max-lora-rank`. vLLM defaults to 16; 64 admits the ranks common in
published adapters (QLoRA trains r=64) while bounding a dense row at 64·(d_in + d_out) per target."""

_TARGET_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


@dataclass
class AdapterInfo:
    """What the engine needs to know about one resident adapter."""

    name: str
    uid: int
    kind: str
    """`dense` or `bank`"""
    index: int
    """row in the dense stacks, or core index in the bank"""
    cluster: int = -1
    """bank cluster (bank adapters only)"""
    alora_invocation_tokens: list[int] | None = None
    """activated adapter: applies from the last occurrence of these tokens onward"""
    r: int = 0
    config: dict = field(default_factory=dict)

    @property
    def activated(self) -> bool:
        return bool(self.alora_invocation_tokens)


def parse_target(key: str) -> tuple[int, str]:
    """PEFT key prefix of a target module -> (layer, module), e.g. `...layers.3.self_attn.q_proj`
    -> (3, 'q_proj')."""
    m = _TARGET_RE.search(module_name(key))
    if not m:
        raise ValueError(
            f"cannot serve an adapter on {key!r}: only the attention and MLP projections of decoder layers "
            "(q/k/v/o_proj, gate/up/down_proj) are adaptable"
        )
    return int(m.group(1)), m.group(2)


def _capacity(n: int) -> int:
    """Rows the dense stacks hold for n adapters: a power of two >= 4 (0 for none), so adding is
    amortised O(1) rows copied, and the size depends on the resident adapters alone."""
    return 0 if n == 0 else max(4, 1 << (n - 1).bit_length())


class AdapterRegistry:
    """Name -> adapter; owns the stacked dense factors and the bank tensors on the model's device.

    Dense invariant: the n dense adapters hold rows 0..n-1; the stack of a target is as wide as the
    largest rank a resident adapter has there (dropped when none uses it), its capacity is
    `_capacity(n)`, and everything outside an adapter's own factors is zero. Unloading moves the
    last row into the hole (its `AdapterInfo.index` changes; `batch()` reads indices when it builds
    a `LoraBatch`, and the cached one is dropped) and shrinks the stacks, so memory follows the
    resident set, not the largest adapter ever seen.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, model=None,
                 max_lora_rank: int | None = None):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.model = model
        """the Transformer, if a bank's shrink may be folded into its weights (`add_extra_outputs`)"""
        if max_lora_rank is not None and (isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int)
                                          or max_lora_rank < 1):
            raise ValueError(f"max_lora_rank must be a positive int or None, got {max_lora_rank!r}")
        self.max_lora_rank = max_lora_rank
        """largest dense adapter rank `add_adapter` accepts (None: any)"""
        self.fold = self.device.type == "cpu"
        """CPU layouts for the bank: a one-cluster basis folded into the base GEMM, several clusters
        on the grouped torch path with cores gathered once per batch (CUDA runs the fused kernel)"""
        # K=1 bank on CPU: V is folded into the base weight; (layer, group) -> (Uᵀ (R, d_out), R, j).
        # K>1 bank on CPU: (layer, group) -> (V (K, d_in, R), Uᵀ (K, R, d_out), R, j).
        # Either way the group's cores are entry j of `_cores[R]` (J, n + 1, R, R) (in `core_layout`)
        # or (J, n + 1, R), whose last row is zero (base tokens and pads). One gather per R per batch
        # serves every layer, and decode steps that repeat the batch reuse it.
        self._folded: dict[tuple[int, str], tuple[torch.Tensor, int, int]] = {}
        self._folded_blocks: dict[tuple[int, str], list[tuple[slice, slice]]] = {}
        """(layer, group) of a fused group of several modules -> per module (its columns of the
        fused rank, its columns of the output): Uᵀ is block diagonal there, and from
        `BLOCK_EXPAND_MIN_ROWS` rows an expand per block skips the zero blocks' FLOPs"""
        self._grouped: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self._cores: dict[int, torch.Tensor] = {}
        self._folded_bytes = 0
        """bytes of the shrink rows appended to the base weights"""
        self._batch_cache: tuple[tuple[int, ...], LoraBatch] | None = None
        self._by_name: dict[str, AdapterInfo] = {}
        self._by_uid: dict[int, AdapterInfo] = {}
        self._next_uid = 0
        # dense: (layer, module) -> [lora_A (cap, r, d_in), lora_B (cap, d_out, r)], r per target
        self._dense: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._dense_cap = 0
        self._dense_ranks: dict[int, dict[tuple[int, str], int]] = {}
        """uid -> the rank it has at each target it adapts"""
        # bank: (layer, group) -> (U (K, d_out, g*r), V (K, d_in, g*r), S (n, g*r, g*r) or (n, g*r))
        self._bank: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.bank: Bank | None = None

    # ------------------------------------------------------------------ lookup
    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> AdapterInfo:
        info = self._by_name.get(name)
        if info is None:
            preview = ", ".join(list(self._by_name)[:8]) + (" ..." if len(self._by_name) > 8 else "")
            raise KeyError(f"no adapter named {name!r} is loaded (loaded: {preview or 'none'})")
        return info

    def _check_name(self, name: str, replace: bool = False) -> None:
        if not isinstance(name, str) or not name or name == "base" or ":" in name:
            raise ValueError(f"adapter name must be a non-empty string other than 'base' without ':', got {name!r}")
        old = self._by_name.get(name)
        if old is not None and not replace:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        if old is not None and old.kind != "dense":
            raise ValueError(f"adapter {name!r} is a bank entry and cannot be replaced (grow the bank with Bank.add)")

    def _new(self, name: str, **kw) -> AdapterInfo:
        self._batch_cache = None
        self._check_name(name)
        info = AdapterInfo(name=name, uid=self._next_uid, **kw)
        self._next_uid += 1
        self._by_name[name], self._by_uid[info.uid] = info, info
        return info

    def _check_target(self, who: str, key: str, d_in: int, d_out: int) -> tuple[int, str]:
        layer, module = parse_target(key)
        if layer >= self.config.num_layers:
            raise ValueError(f"{who}: target {key!r} is layer {layer}, the model has {self.config.num_layers} layers")
        want = self.config.module_shape(module)
        if (d_in, d_out) != want:
            raise ValueError(f"{who}: {key!r} maps {d_in} -> {d_out} features, the model's {module} maps "
                             f"{want[0]} -> {want[1]} (adapter made for another base model?)")
        return layer, module

    # ------------------------------------------------------------------- dense
    def load_adapter(self, name: str, path: str | os.PathLike, *, replace: bool = False) -> AdapterInfo:
        """Load a PEFT directory (safetensors only) as a dense adapter (`replace`: see `add_adapter`)."""
        self._check_name(name, replace)
        return self.add_adapter(name, load_adapter(Path(path), name=name), replace=replace)

    def add_adapter(self, name: str, adapter: LoraAdapter, *, replace: bool = False) -> AdapterInfo:
        """Add a dense adapter as the next row of the stacks. `replace=True` first unloads a dense
        adapter already loaded as `name` (vLLM's `load_inplace`); the new one gets a new uid, so no
        block cached under the old weights is reused. Everything is checked before any tensor
        changes, so a refused adapter leaves the registry as it was (the old one included)."""
        self._check_name(name, replace)
        targets = {}
        for key, a in adapter.lora_A.items():
            b = adapter.lora_B[key]
            targets[self._check_target(f"adapter {name!r}", key, a.shape[1], b.shape[0])] = (a, b)
        ranks = {key: a.shape[0] for key, (a, _) in targets.items()}
        r = max(ranks.values())
        if self.max_lora_rank is not None and r > self.max_lora_rank:
            raise ValueError(f"adapter {name!r} has rank {r}, over the server's max_lora_rank {self.max_lora_rank} "
                             f"(start it with --max-lora-rank {r} or more)")
        if name in self._by_name:  # replace=True, checked above
            self.unload(name)
        row = len(self._dense_ranks)
        cap = _capacity(row + 1)
        if cap != self._dense_cap:
            for key, (a, _) in self._dense.items():
                self._resize(key, cap, a.shape[1])
            self._dense_cap = cap
        for key, (a, b) in targets.items():
            if key not in self._dense:
                self._dense[key] = self._zeros(key, cap, ranks[key])
            elif ranks[key] > self._dense[key][0].shape[1]:
                self._resize(key, cap, ranks[key])
            stacks = self._dense[key]
            stacks[0][row, : a.shape[0]] = a.to(self.device, self.dtype)
            stacks[1][row, :, : b.shape[1]] = b.to(self.device, self.dtype)
        info = self._new(name, kind="dense", index=row, r=r, config=adapter.config,
                         alora_invocation_tokens=adapter.alora_invocation_tokens)
        self._dense_ranks[info.uid] = ranks
        return info

    def _zeros(self, key: tuple[int, str], cap: int, r: int) -> list[torch.Tensor]:
        d_in, d_out = self.config.module_shape(key[1])
        kw = dict(dtype=self.dtype, device=self.device)
        return [torch.zeros(cap, r, d_in, **kw), torch.zeros(cap, d_out, r, **kw)]  # (cap, r, d_in), (cap, d_out, r)

    def _resize(self, key: tuple[int, str], cap: int, r: int) -> None:
        """Reallocate one target's stacks as (cap, r), keeping the rows and ranks both shapes share."""
        a, b = self._dense[key]
        new = self._zeros(key, cap, r)
        n, k = min(cap, a.shape[0]), min(r, a.shape[1])
        new[0][:n, :k] = a[:n, :k]
        new[1][:n, :, :k] = b[:n, :, :k]
        self._dense[key] = new

    def _remove_dense(self, info: AdapterInfo) -> None:
        """Free `info`'s row: the last row moves into it, then every stack shrinks to what is left."""
        gone = self._dense_ranks.pop(info.uid)
        last = len(self._dense_ranks)
        if info.index != last:
            moved = next(i for i in self._by_uid.values() if i.kind == "dense" and i.index == last)
            moved.index = info.index
        for a, b in self._dense.values():
            a[info.index] = a[last]  # also clears the hole in targets the moved adapter does not use
            b[info.index] = b[last]
            a[last].zero_()
            b[last].zero_()
        cap = _capacity(last)
        for key in list(self._dense):
            r = self._dense[key][0].shape[1]
            if gone.get(key) == r or not self._dense_ranks:  # only the leaver's widest targets can narrow
                r = max((ranks.get(key, 0) for ranks in self._dense_ranks.values()), default=0)
            if r == 0:
                del self._dense[key]
            elif (cap, r) != self._dense[key][0].shape[:2]:
                self._resize(key, cap, r)
        self._dense_cap = cap
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed stacks back to the driver, not just the cache

    # -------------------------------------------------------------------- bank
    def load_bank(self, bank: Bank | str | os.PathLike, prefix: str = "") -> list[AdapterInfo]:
        """Make every entry of a bank servable as `prefix + name`. One bank per engine.

        The bank's per-module bases are fused per linear group (q|k|v, gate|up) so one call per
        group does the work: V's side by side (K, d_in, g·r), U block-diagonal (K, d_out, g·r),
        cores block-diagonal (n, g·r, g·r) or, for JD-Diag, concatenated (n, g·r). The zero blocks
        cost a few r-wide FLOPs; the saved kernel launches are what matters at decode sizes.
        On CPU (`fold`) one cluster's V is folded into the base weights and several clusters take
        the routed torch path (U stored transposed, which its expand reads ~2x faster); either way
        the cores are stacked per fused rank so one gather per batch serves every layer.
        """
        if not isinstance(bank, Bank):
            bank = Bank.load(bank)
        if self.bank is not None:
            raise ValueError("a bank is already loaded; an engine serves one bank (grow it with Bank.add)")
        for e in bank.entries:  # before any tensor is built: a refused bank changes nothing
            self._check_name(prefix + e.name)
        per_module = {}
        for info in bank.targets:
            per_module[self._check_target("bank", info.name, info.in_features, info.out_features)] = info.name
        fused, cores_by_rank = {}, {}
        cast = lambda t: t.to(self.device, self.dtype).contiguous()  # noqa: E731
        r, k, n = bank.rank, bank.num_clusters, len(bank.entries)
        # A folded bank's per-token math (cores, expand) is a few tiny GEMMs per group: on CPU in
        # bfloat16 each costs ~40-60 us of oneDNN dispatch, in float32 ~10 (MKL), so it runs in
        # float32 there (more exact too); x V comes out of the base GEMM in the model's dtype.
        small = torch.float32 if self.fold and k == 1 and self.model is not None else self.dtype
        cast_small = lambda t: t.to(self.device, small).contiguous()  # noqa: E731
        diag = next(iter(bank.cores.values())).dim() == 2  # jd-diag, and svd (each adapter its own basis)
        for layer in range(self.config.num_layers):
            for group, modules in FUSED_GROUPS.items():
                present = [m for m in modules if (layer, m) in per_module]
                if not present:
                    continue
                d_in = self.config.module_shape(modules[0])[0]
                outs = [self.config.module_shape(m)[1] for m in modules]
                rg = r * len(present)
                U = torch.zeros(k, sum(outs), rg)
                V = torch.zeros(k, d_in, rg)
                S = torch.zeros(n, rg) if diag else torch.zeros(n, rg, rg)
                for j, m in enumerate(present):
                    name = per_module[(layer, m)]
                    off = sum(outs[: modules.index(m)])
                    cols = slice(j * r, (j + 1) * r)
                    U[:, off: off + outs[modules.index(m)], cols] = bank.U[name].float()
                    V[:, :, cols] = bank.V[name].float()
                    if diag:
                        S[:, cols] = bank.cores[name].float()
                    else:
                        S[:, cols, cols] = bank.cores[name].float()
                if not self.fold:
                    fused[(layer, group)] = (cast(U), cast(V), cast(S))
                    continue
                j = len(cores_by_rank.setdefault(rg, []))
                cores_by_rank[rg].append(core_layout(torch.cat([S, S[:1] * 0])))
                if k == 1 and self.model is not None:
                    # One GEMM yields both x Wᵀ and the shrink x V at the cost of the base GEMM alone
                    # (+24 rows on a 512x256 weight is within noise; a separate small mm costs
                    # ~15-30 us per call on CPU).
                    self._folded_bytes += self.model.add_extra_outputs(layer, group, cast(V[0].T))
                    self._folded[(layer, group)] = (cast_small(U[0].T), rg, j)
                    if len(present) > 1:
                        blocks = []
                        for jj, m in enumerate(present):
                            off = sum(outs[: modules.index(m)])
                            blocks.append((slice(jj * r, (jj + 1) * r), slice(off, off + outs[modules.index(m)])))
                        self._folded_blocks[(layer, group)] = blocks
                else:
                    self._grouped[(layer, group)] = (cast(V), cast(U.transpose(1, 2)), rg, j)
        self._cores = {rg: cast_small(torch.stack(c)) for rg, c in cores_by_rank.items()}
        self._bank, self.bank = fused, bank
        return [self._new(prefix + e.name, kind="bank", index=e.index, cluster=e.cluster, r=e.r,
                          config=e.config, alora_invocation_tokens=e.alora_invocation_tokens)
                for e in bank.entries]

    # ------------------------------------------------------------------ unload
    def unload(self, name: str) -> AdapterInfo:
        info = self.get(name)
        self._batch_cache = None
        del self._by_name[name], self._by_uid[info.uid]
        if info.kind == "dense":
            self._remove_dense(info)
        return info

    def memory_bytes(self, kind: str | None = None) -> int:
        """Bytes of adapter tensors on the device: `dense` stacks, `bank` tensors (fused bases and
        cores, folded Uᵀ and cores, the shrink rows folded into the base weights), or both (None)."""
        if kind not in (None, "dense", "bank"):
            raise ValueError(f"kind must be 'dense', 'bank' or None, got {kind!r}")
        tensors = []
        if kind in (None, "dense"):
            tensors += [t for stacks in self._dense.values() for t in stacks]
        if kind in (None, "bank"):
            tensors += [t for ts in self._bank.values() for t in ts] + list(self._cores.values())
            tensors += [ut for ut, _, _ in self._folded.values()]
            tensors += [t for v, ut, _, _ in self._grouped.values() for t in (v, ut)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values()) + (self._folded_bytes if kind in (None, "bank") else 0)

    # ------------------------------------------------------------------- batch
    def lora_tensors(self) -> LoraTensors:
        """What a forward's `LoraBatch` reads: the dense stacks and the bank's layouts, by reference."""
        bank = self.bank
        return LoraTensors(config=self.config, device=self.device, dense=self._dense, bank=self._bank,
                           folded=self._folded, folded_blocks=self._folded_blocks, grouped=self._grouped,
                           cores=self._cores, num_clusters=bank.num_clusters if bank is not None else 0,
                           num_entries=len(bank.entries) if bank is not None else 0)

    def batch(self, uids: list[int]) -> LoraBatch | None:
        """The per-forward LoRA hook for tokens carrying these uids (None when all are base).

        Consecutive decode steps of the same sequences carry the same uids: the routing built for
        the previous step is reused (the registry drops it whenever an adapter comes or goes)."""
        if all(u == BASE for u in uids):
            return None
        key = tuple(uids)
        if self._batch_cache is not None and self._batch_cache[0] == key:
            return self._batch_cache[1]
        dense_ids, clusters, cores = [], [], []
        for u in uids:
            info = self._by_uid.get(u) if u != BASE else None
            if info is None:
                dense_ids.append(-1), clusters.append(-1), cores.append(-1)
            elif info.kind == "dense":
                dense_ids.append(info.index), clusters.append(-1), cores.append(-1)
            else:
                dense_ids.append(-1), clusters.append(info.cluster), cores.append(info.index)
        batch = LoraBatch(self.lora_tensors(), dense_ids, clusters, cores)
        self._batch_cache = (key, batch)
        return batch

