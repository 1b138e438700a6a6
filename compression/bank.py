"""The adapter bank: shared bases per (slot, cluster) and a tiny core per adapter, on disk.

A bank directory holds

- `bank.safetensors`: for every slot `<slot>.U` (K, d_out, r), `<slot>.V` (K, d_in, r) and
  `<slot>.sigma` (n, r, r) for JD-Full or (n, r) for JD-Diag / SVD;
- `bank.json`: format version, base model, target modules, method, rank, clusters, slots,
  adapters (name → index, cluster, original r / lora_alpha / use_rslora / activation tokens,
  the slots it adapts, relative reconstruction error), and the sha256 of the tensor file.

Adapter i on slot s is ΔŴ = U[c_i] Σ_i V[c_i]ᵀ. An SVD bank gives every adapter its own
cluster. Errors are relative Frobenius norms over the whole adapter (all its slots together):
‖ΔW − ΔŴ‖_F / ‖ΔW‖_F.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import jd
from .jsonfields import describe, from_json, json_type, matches, short
from .peft_io import LoraAdapter, SlotInfo, check_output_name, save_adapter

FORMAT_VERSION = 1
TENSORS_NAME = "bank.safetensors"
META_NAME = "bank.json"
BACKUP_SUFFIX = ".kilolora-old"
"""`.<name>.kilolora-old` beside a bank holds the old bank while an overwrite swaps in the new one."""
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TENSOR_KEYS = ("U", "V", "sigma")


@dataclass
class BankEntry:
    """One adapter in the bank."""

    name: str
    index: int
    """row of every `<slot>.sigma`"""
    cluster: int
    """which U, V basis it uses"""
    slots: list[str]
    """the slots the original adapter adapts (others are zero)"""
    r: int
    lora_alpha: float
    use_rslora: bool = False
    alora_invocation_tokens: list[int] | None = None
    rel_error: float = 0.0
    """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over all its slots"""
    num_parameters: int = 0
    """parameters of the original adapter"""
    bytes: int = 0
    """bytes of the original adapter's weights"""
    source: str = "compressed"
    """`compressed` or `added` (projected onto an existing basis)"""
    config: dict = field(default_factory=dict)
    """the original adapter_config.json, used as the template on export"""


@dataclass
class Bank:
    """Shared bases and per-adapter cores; see the module docstring for the layout."""

    method: str
    rank: int
    slots: list[SlotInfo]
    U: dict[str, torch.Tensor]
    V: dict[str, torch.Tensor]
    sigma: dict[str, torch.Tensor]
    entries: list[BankEntry]
    base_model_name_or_path: str | None = None
    target_modules: list[str] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    """relative objective Σw‖ΔW−ΔŴ‖²/Σw‖ΔW‖²: `fit` per iteration, `clustering` per round; and of the
    final fits `iterations` / `converged` (slot → one per cluster), `max_iters`, `tol`, `weighting`"""
    dtype: str = "float32"

    # ----------------------------------------------------------------------------- lookup

    @property
    def num_clusters(self) -> int:
        return next(iter(self.U.values())).shape[0]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, name: str) -> BankEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"no adapter named {name!r} in the bank (it has {len(self.entries)}: {_preview(self.names)})")

    def factors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """PEFT factors of one adapter: lora_A[slot] = V_cᵀ (r, d_in), lora_B[slot] = U_c Σ_i (d_out, r)."""
        e = self.entry(name)
        lora_A, lora_B = {}, {}
        for s in e.slots:
            U, V, S = self.U[s][e.cluster].float(), self.V[s][e.cluster].float(), self.sigma[s][e.index].float()
            lora_A[s] = V.T.contiguous()
            lora_B[s] = U @ S if S.dim() == 2 else U * S
        return lora_A, lora_B

    def reconstruct(self, name: str) -> dict[str, torch.Tensor]:
        """Dense ΔŴ (d_out, d_in) per slot of one adapter."""
        lora_A, lora_B = self.factors(name)
        return {s: lora_B[s] @ lora_A[s] for s in lora_A}

    def export(self, name: str, out_dir: str | os.PathLike) -> Path:
        """Write one adapter as a PEFT directory (B' = U Σ_i, A' = Vᵀ, scaling 1)."""
        e = self.entry(name)
        lora_A, lora_B = self.factors(name)
        config = dict(e.config)
        config.setdefault("base_model_name_or_path", self.base_model_name_or_path)
        if e.alora_invocation_tokens is not None:
            config["alora_invocation_tokens"] = list(e.alora_invocation_tokens)
        return save_adapter(out_dir, lora_A, lora_B, config, dtype=_DTYPES[self.dtype])

    # ------------------------------------------------------------------------------- grow

    def add(self, adapter: LoraAdapter, name: str | None = None) -> BankEntry:
        """Project a new adapter onto the basis of the cluster that reconstructs it best.

        JD banks keep their bases (Σ = Uᵀ ΔW V, or least-squares diagonal); an SVD bank
        gives the new adapter its own truncated-SVD basis. Nothing is recompressed.
        """
        name = name if name is not None else adapter.name
        if name in self.names:
            raise ValueError(f"the bank already has an adapter named {name!r}; pass another --name")
        slot_info = {s.name: s for s in self.slots}
        for s, info in adapter.slots.items():
            if s not in slot_info:
                raise ValueError(f"adapter {name!r} adapts slot {s!r}, which the bank has no basis for")
            if info != slot_info[s]:
                want = slot_info[s]
                raise ValueError(
                    f"adapter {name!r} slot {s!r} has shape (out={info.out_features}, in={info.in_features}) "
                    f"but the bank has (out={want.out_features}, in={want.in_features})"
                )
        factors = {}
        for s in self.slots:
            if s.name in adapter.lora_A:
                factors[s.name] = (adapter.lora_A[s.name][None], adapter.lora_B[s.name][None])
            else:
                factors[s.name] = (torch.zeros(1, 1, s.in_features), torch.zeros(1, s.out_features, 1))
        norm = sum(float(jd.sq_norms(A, B)[0]) for A, B in factors.values())

        if self.method == "svd":
            cluster, err, new_U, new_V, cores = self.num_clusters, 0.0, {}, {}, {}
            for s, (A, B) in factors.items():
                U, sv, V = jd.svd_per_adapter(A, B, self.rank)
                new_U[s], new_V[s], cores[s] = U, V, sv
                err += float(jd.svd_tail(A, B, self.rank)[0])
            for s in factors:
                self.U[s] = torch.cat([self.U[s], new_U[s].to(self.U[s].dtype)])
                self.V[s] = torch.cat([self.V[s], new_V[s].to(self.V[s].dtype)])
        else:
            errors = torch.zeros(self.num_clusters)
            for s, (A, B) in factors.items():
                for k in range(self.num_clusters):
                    errors[k] += float(jd.ERRORS[self.method](A, B, self.U[s][k].float(), self.V[s][k].float())[0])
            cluster = int(errors.argmin())
            err = float(errors[cluster])
            cores = {
                s: jd.CORES[self.method](A, B, self.U[s][cluster].float(), self.V[s][cluster].float())
                for s, (A, B) in factors.items()
            }
        for s in factors:
            self.sigma[s] = torch.cat([self.sigma[s], cores[s].to(self.sigma[s].dtype)])
        entry = BankEntry(
            name=name,
            index=len(self.entries),
            cluster=cluster,
            slots=sorted(adapter.lora_A),
            r=adapter.r,
            lora_alpha=adapter.lora_alpha,
            use_rslora=adapter.use_rslora,
            alora_invocation_tokens=adapter.alora_invocation_tokens,
            rel_error=(err / norm) ** 0.5 if norm > 0 else 0.0,
            num_parameters=adapter.num_parameters(),
            bytes=adapter.num_parameters() * adapter.dtype.itemsize,
            source="added",
            config=adapter.config,
        )
        self.entries.append(entry)
        return entry

    # ------------------------------------------------------------------------------ stats

    def num_parameters(self) -> int:
        return sum(t.numel() for d in (self.U, self.V, self.sigma) for t in d.values())

    def stats(self) -> dict:
        """Sizes before / after and reconstruction errors (relative Frobenius, per adapter)."""
        before = sum(e.num_parameters for e in self.entries)
        after = self.num_parameters()
        bytes_before = sum(e.bytes for e in self.entries)
        bytes_after = after * _DTYPES[self.dtype].itemsize
        errs = [e.rel_error for e in self.entries]
        iters = [i for i in _per_fit(self.history, "iterations") if not isinstance(i, bool) and isinstance(i, int)]
        converged = [c for c in _per_fit(self.history, "converged") if isinstance(c, bool)]
        return {
            "method": self.method,
            "adapters": len(self.entries),
            "slots": len(self.slots),
            "rank": self.rank,
            "clusters": self.num_clusters,
            "params_before": before,
            "params_after": after,
            "params_saved": 1 - after / before if before else 0.0,
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "rel_error_mean": sum(errs) / len(errs) if errs else 0.0,
            "rel_error_max": max(errs) if errs else 0.0,
            "cluster_sizes": [sum(e.cluster == k for e in self.entries) for k in range(self.num_clusters)]
            if self.method != "svd"
            else [],
            "fit_iterations_max": max(iters) if iters else None,
            "fit_iterations_mean": sum(iters) / len(iters) if iters else None,
            "fit_converged": sum(converged) / len(converged) if converged else None,
        }

    # ------------------------------------------------------------------------------- disk

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the bank atomically: a temp dir beside `out_dir`, then a rename.

        `overwrite` replaces an existing bank (a directory with bank.json), nothing else, by a
        swap: old → `.<name>.kilolora-old`, new → `out_dir`, then the old one is deleted. A run
        killed between the renames leaves the old bank in the backup; the next `save`,
        `load` or `check_output` of `out_dir` puts it back.
        """
        target = Path(os.path.abspath(out_dir))
        check_output(target, overwrite)
        tensors = self._stored_tensors()  # refuses NaN/Inf before anything is written
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "kilolora.bank"})
            meta = {
                "format": "kilolora.bank",
                "format_version": FORMAT_VERSION,
                "base_model_name_or_path": self.base_model_name_or_path,
                "target_modules": self.target_modules,
                "method": self.method,
                "rank": self.rank,
                "num_clusters": self.num_clusters,
                "dtype": self.dtype,
                "slots": [asdict(s) for s in self.slots],
                "adapters": [asdict(e) for e in self.entries],
                "history": self.history,
                "stats": self.stats(),
                "tensors_sha256": _sha256(tmp / TENSORS_NAME),
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
            if target.exists() or target.is_symlink():
                _swap(tmp, target)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Path(out_dir)

    def _stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor in the stored dtype; NaN or Inf (also from overflow in float16) is refused."""
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        dtype = _DTYPES[self.dtype]
        tensors = {
            f"{s.name}.{key}": getattr(self, key)[s.name].to(dtype).contiguous() for s in self.slots for key in _TENSOR_KEYS
        }
        bad = first_non_finite(tensors.items())
        if bad is not None:
            hint = "; values beyond float16's range: store float32 (--dtype float32)" if self.dtype == "float16" else ""
            raise ValueError(f"bank tensor {bad} has NaN or Inf values (as {self.dtype}); nothing was written{hint}")
        return tensors

    @classmethod
    def load(cls, bank_dir: str | os.PathLike) -> Bank:
        """Read a bank directory, verifying the tensor file's sha256, every field, shape and value."""
        bank_dir = Path(bank_dir)
        recover(bank_dir)
        meta_path, tensor_path = bank_dir / META_NAME, bank_dir / TENSORS_NAME
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ValueError(f"{bank_dir}: not a kilolora bank (needs {META_NAME} and {TENSORS_NAME})")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{meta_path}: invalid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {json_type(meta)}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}; this kilolora reads {FORMAT_VERSION}")
        _check_meta(meta, meta_path)
        if _sha256(tensor_path) != meta.get("tensors_sha256"):
            raise ValueError(f"{tensor_path}: sha256 does not match {META_NAME}; the bank is corrupt or was modified")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{tensor_path}: corrupt safetensors file ({e})") from None
        slots = [from_json(SlotInfo, s, f"{meta_path}: slots[{i}]") for i, s in enumerate(meta["slots"])]
        entries = [from_json(BankEntry, e, f"{meta_path}: adapters[{i}]") for i, e in enumerate(meta["adapters"])]
        dtype = meta.get("dtype", "float32")
        want = {f"{s.name}.{key}" for s in slots for key in _TENSOR_KEYS}
        odd = sorted(want ^ set(tensors))
        if odd:
            what = "missing tensor" if odd[0] in want else "unexpected tensor"
            raise ValueError(
                f"{tensor_path}: {what} {odd[0]!r}; a bank holds <slot>.U, .V and .sigma of the slots in {META_NAME}"
            )
        for name, t in tensors.items():
            if t.dtype != _DTYPES[dtype]:
                got = str(t.dtype).removeprefix("torch.")
                raise ValueError(f"{tensor_path}: tensor {name!r} has dtype {got}; {META_NAME} says {dtype}")
        bad = first_non_finite(tensors.items())
        if bad is not None:
            raise ValueError(f"{tensor_path}: tensor {bad!r} has NaN or Inf values; the bank is corrupt")
        bank = cls(
            method=meta["method"],
            rank=meta["rank"],
            slots=slots,
            U={s.name: tensors[f"{s.name}.U"] for s in slots},
            V={s.name: tensors[f"{s.name}.V"] for s in slots},
            sigma={s.name: tensors[f"{s.name}.sigma"] for s in slots},
            entries=entries,
            base_model_name_or_path=meta.get("base_model_name_or_path"),
            target_modules=meta.get("target_modules", []),
            history=meta.get("history", {}),
            dtype=dtype,
        )
        bank.check()
        return bank

    def check(self) -> None:
        """Raise ValueError unless names are unique and every tensor has the shape the metadata implies."""
        for what, names in (("slot", [s.name for s in self.slots]), ("adapter", self.names)):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"the bank lists {what} {name!r} twice; {what} names must be unique")
                seen.add(name)
        K, n, r = self.num_clusters, len(self.entries), self.rank
        for s in self.slots:
            want = {
                "U": (K, s.out_features, r),
                "V": (K, s.in_features, r),
                "sigma": (n, r, r) if self.method == "jd-full" else (n, r),
            }
            for key, shape in want.items():
                got = tuple(getattr(self, key)[s.name].shape)
                if got != shape:
                    raise ValueError(f"bank tensor {s.name}.{key} has shape {got}, expected {shape}")
        slot_names = {s.name for s in self.slots}
        for i, e in enumerate(self.entries):
            if e.index != i or not 0 <= e.cluster < K:
                raise ValueError(f"bank entry {e.name!r} has index {e.index} / cluster {e.cluster}; expected {i} / [0, {K})")
            extra = sorted(set(e.slots) - slot_names)
            if extra:
                raise ValueError(f"bank entry {e.name!r} adapts slot {extra[0]!r}, which the bank has no basis for")


def _per_fit(history: dict, key: str) -> list:
    """history[key] (slot → one value per cluster) flattened; other shapes (older banks, or a
    hand-edited bank.json: the history is not checked) give none."""
    per_slot = history.get(key)
    if not isinstance(per_slot, dict):
        return []
    return [x for per_cluster in per_slot.values() if isinstance(per_cluster, list) for x in per_cluster]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _preview(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


# ------------------------------------------------------------------------- safe writes


def _backup(target: Path) -> Path:
    return target.parent / f".{target.name}{BACKUP_SUFFIX}"


def _swap(new: Path, target: Path) -> None:
    """Replace the bank at `target` by `new`; at every instant a bank is at `target` or in its backup."""
    backup = _backup(target)
    os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(backup, target)  # if this fails too, `recover` puts the old bank back later
        raise
    shutil.rmtree(backup, ignore_errors=True)


def recover(bank_dir: str | os.PathLike) -> None:
    """Finish an overwrite killed mid-swap: restore the old bank from its backup, or drop a stale backup."""
    target = Path(os.path.abspath(bank_dir))
    backup = _backup(target)
    if len(os.fsencode(backup.name)) > 255 or not backup.is_dir():
        return
    if not target.exists() and not target.is_symlink():
        if (backup / META_NAME).is_file():
            os.replace(backup, target)
    elif (target / META_NAME).is_file():  # the new bank is in place: the backup is the old one
        shutil.rmtree(backup, ignore_errors=True)


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ValueError unless a bank may be written at `out_dir`: a new path, or an existing bank to overwrite."""
    target = Path(os.path.abspath(out_dir))
    check_output_name(target)
    recover(target)
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"output directory already exists: {out_dir} (pass --overwrite to replace it, if it is a bank)")
    if not (target.is_dir() and (target / META_NAME).is_file()):
        raise ValueError(
            f"refusing to overwrite {out_dir}: it is not a kilolora bank (no {META_NAME}); overwrite only replaces a bank"
        )


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor with a NaN or Inf, or None."""
    return next((name for name, t in named if not torch.isfinite(t).all()), None)


# -------------------------------------------------------------------- bank.json fields

_META_FIELDS = {
    "method": str,
    "rank": int,
    "slots": list,
    "adapters": list,
    "dtype": str,
    "base_model_name_or_path": str | None,
    "target_modules": list[str],
    "history": dict,
}
_REQUIRED = ("method", "rank", "slots", "adapters")


def _check_meta(meta: dict, where: Path) -> None:
    for name in _REQUIRED:
        if name not in meta:
            raise ValueError(f"{where}: missing field {name!r}")
    for name, hint in _META_FIELDS.items():
        if name in meta and not matches(meta[name], hint):
            raise ValueError(f"{where}: {name} must be {describe(hint)}; got {short(meta[name])}")
    if meta["method"] not in jd.METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(jd.METHODS)}; got {meta['method']!r}")
    if meta["rank"] < 1:
        raise ValueError(f"{where}: rank must be >= 1; got {meta['rank']}")
    dtype = meta.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"{where}: dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
