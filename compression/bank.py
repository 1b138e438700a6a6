"""The adapter bank: shared bases per (target, cluster) and a tiny core per adapter, on disk.

A *target* is one adapted linear layer, a (layer, module) named by its PEFT key prefix (see
`peft_io`). A bank directory holds

- `bank.safetensors`: for every target `<target>.U` (K, d_out, r), `<target>.V` (K, d_in, r) and
  the per-adapter cores `<target>.cores` (n, r, r) for JD-Full or (n, r) for JD-Diag / SVD;
- `bank.json`: format version, base model, target modules, method, rank, clusters, targets,
  adapters (name → index, cluster, original r / lora_alpha / use_rslora / activation tokens,
  the targets it adapts, relative reconstruction error), and the sha256 of the tensor file.

Adapter i on target t is ΔŴ = U[c_i] Σ_i V[c_i]ᵀ, Σ_i = `cores[t][i]`. An SVD bank gives every
adapter its own cluster. Errors are relative Frobenius norms over the whole adapter (all its
targets together): ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F.

Format version 2 is written. Version 1 banks, which called the targets `slots` (in bank.json:
`slots`, `adapters[].slots`, `stats.slots`) and the cores `<slot>.sigma`, are still read: the
names are mapped on load (the sha256 is over the tensor file's bytes, so it checks either name).
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
from .peft_io import LoraAdapter, TargetInfo, check_output_name, save_adapter

FORMAT_VERSION = 2
"""the version `save` writes; `load` reads every version in `_NAMES`"""
TENSORS_NAME = "bank.safetensors"
META_NAME = "bank.json"
BACKUP_SUFFIX = ".kilolora-old"
"""`.<name>.kilolora-old` beside a bank holds the old bank while an overwrite swaps in the new one."""
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TENSOR_KEYS = ("U", "V", "cores")
"""`<target>.<key>` in the tensor file, and the Bank attribute that holds it"""
_NAMES = {1: ("slots", "sigma"), 2: ("targets", "cores")}
"""format_version → (the bank.json key of the targets, at the top, in adapters[] and in stats;
the tensor key of the cores)"""


@dataclass
class BankEntry:
    """One adapter in the bank."""

    name: str
    index: int
    """row of every `<target>.cores`"""
    cluster: int
    """which U, V basis it uses"""
    targets: list[str]
    """the targets the original adapter adapts (others are zero)"""
    r: int
    lora_alpha: float
    use_rslora: bool = False
    alora_invocation_tokens: list[int] | None = None
    rel_error: float = 0.0
    """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over all its targets"""
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
    targets: list[TargetInfo]
    """the adapted layers, e.g. `base_model.model.model.layers.0.self_attn.q_proj`, with their shapes"""
    U: dict[str, torch.Tensor]
    """target → (K, d_out, r)"""
    V: dict[str, torch.Tensor]
    """target → (K, d_in, r)"""
    cores: dict[str, torch.Tensor]
    """target → Σ_i of every adapter, (n, r, r) for jd-full, (n, r) for jd-diag and svd"""
    entries: list[BankEntry]
    base_model_name_or_path: str | None = None
    target_modules: list[str] = field(default_factory=list)
    """the union of the adapters' peft `target_modules` (module names such as `q_proj`)"""
    history: dict = field(default_factory=dict)
    """relative objective Σw‖ΔW−ΔŴ‖²/Σw‖ΔW‖²: `fit` per iteration, `clustering` per round; and of the
    final fits `iterations` / `converged` (target → one per cluster), `max_iters`, `tol`, `weighting`"""
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
        """PEFT factors of one adapter: lora_A[target] = V_cᵀ (r, d_in), lora_B[target] = U_c Σ_i (d_out, r)."""
        e = self.entry(name)
        lora_A, lora_B = {}, {}
        for t in e.targets:
            U, V, core = self.U[t][e.cluster].float(), self.V[t][e.cluster].float(), self.cores[t][e.index].float()
            lora_A[t] = V.T.contiguous()
            lora_B[t] = U @ core if core.dim() == 2 else U * core
        return lora_A, lora_B

    def reconstruct(self, name: str) -> dict[str, torch.Tensor]:
        """Dense ΔŴ (d_out, d_in) per target of one adapter."""
        lora_A, lora_B = self.factors(name)
        return {t: lora_B[t] @ lora_A[t] for t in lora_A}

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
        target_info = {t.name: t for t in self.targets}
        for t, info in adapter.targets.items():
            if t not in target_info:
                raise ValueError(f"adapter {name!r} adapts target {t!r}, which the bank has no basis for")
            if info != target_info[t]:
                want = target_info[t]
                raise ValueError(
                    f"adapter {name!r} target {t!r} has shape (out={info.out_features}, in={info.in_features}) "
                    f"but the bank has (out={want.out_features}, in={want.in_features})"
                )
        factors = {}
        for t in self.targets:
            if t.name in adapter.lora_A:
                factors[t.name] = (adapter.lora_A[t.name][None], adapter.lora_B[t.name][None])
            else:
                factors[t.name] = (torch.zeros(1, 1, t.in_features), torch.zeros(1, t.out_features, 1))
        norm = sum(float(jd.sq_norms(A, B)[0]) for A, B in factors.values())

        if self.method == "svd":
            cluster, err, new_U, new_V, cores = self.num_clusters, 0.0, {}, {}, {}
            for t, (A, B) in factors.items():
                U, sv, V = jd.svd_per_adapter(A, B, self.rank)
                new_U[t], new_V[t], cores[t] = U, V, sv
                err += float(jd.svd_tail(A, B, self.rank)[0])
            for t in factors:
                self.U[t] = torch.cat([self.U[t], new_U[t].to(self.U[t].dtype)])
                self.V[t] = torch.cat([self.V[t], new_V[t].to(self.V[t].dtype)])
        else:
            errors = torch.zeros(self.num_clusters)
            for t, (A, B) in factors.items():
                for k in range(self.num_clusters):
                    errors[k] += float(jd.ERRORS[self.method](A, B, self.U[t][k].float(), self.V[t][k].float())[0])
            cluster = int(errors.argmin())
            err = float(errors[cluster])
            cores = {
                t: jd.CORES[self.method](A, B, self.U[t][cluster].float(), self.V[t][cluster].float())
                for t, (A, B) in factors.items()
            }
        for t in factors:
            self.cores[t] = torch.cat([self.cores[t], cores[t].to(self.cores[t].dtype)])
        entry = BankEntry(
            name=name,
            index=len(self.entries),
            cluster=cluster,
            targets=sorted(adapter.lora_A),
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
        return sum(x.numel() for d in (self.U, self.V, self.cores) for x in d.values())

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
            "targets": len(self.targets),
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
        dest = Path(os.path.abspath(out_dir))
        check_output(dest, overwrite)
        tensors = self._stored_tensors()  # refuses NaN/Inf before anything is written
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
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
                "targets": [asdict(t) for t in self.targets],
                "adapters": [asdict(e) for e in self.entries],
                "history": self.history,
                "stats": self.stats(),
                "tensors_sha256": _sha256(tmp / TENSORS_NAME),
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
            if dest.exists() or dest.is_symlink():
                _swap(tmp, dest)
            else:
                os.replace(tmp, dest)
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
            f"{t.name}.{key}": getattr(self, key)[t.name].to(dtype).contiguous() for t in self.targets for key in _TENSOR_KEYS
        }
        bad = first_non_finite(tensors.items())
        if bad is not None:
            hint = "; values beyond float16's range: store float32 (--dtype float32)" if self.dtype == "float16" else ""
            raise ValueError(f"bank tensor {bad} has NaN or Inf values (as {self.dtype}); nothing was written{hint}")
        return tensors

    @classmethod
    def load(cls, bank_dir: str | os.PathLike) -> Bank:
        """Read a bank directory, verifying the tensor file's sha256, every field, shape and value.

        Reads format_version 1 (`slots`, `<slot>.sigma`) as well as 2, mapping the old names.
        """
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
        version = meta.get("format_version")
        if type(version) is not int or version not in _NAMES:  # true, 1.0 and [1] are refused too
            got = short(version) if "format_version" in meta else "none (the field is missing)"
            raise ValueError(
                f"{meta_path}: unknown format_version; this kilolora reads {' or '.join(map(str, _NAMES))}, got {got} "
                "(a bank written by a newer kilolora needs that kilolora)"
            )
        cores_key = _NAMES[version][1]
        meta = _upgrade(meta, version)
        _check_meta(meta, meta_path)
        if _sha256(tensor_path) != meta.get("tensors_sha256"):
            raise ValueError(f"{tensor_path}: sha256 does not match {META_NAME}; the bank is corrupt or was modified")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{tensor_path}: corrupt safetensors file ({e})") from None
        targets = [from_json(TargetInfo, t, f"{meta_path}: targets[{i}]") for i, t in enumerate(meta["targets"])]
        entries = [from_json(BankEntry, e, f"{meta_path}: adapters[{i}]") for i, e in enumerate(meta["adapters"])]
        dtype = meta.get("dtype", "float32")
        want = {f"{t.name}.{key}" for t in targets for key in ("U", "V", cores_key)}
        odd = sorted(want ^ set(tensors))
        if odd:
            what = "missing tensor" if odd[0] in want else "unexpected tensor"
            raise ValueError(
                f"{tensor_path}: {what} {odd[0]!r}; a bank of format_version {version} holds <target>.U, .V and "
                f".{cores_key} of the targets in {META_NAME}"
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
            targets=targets,
            U={t.name: tensors[f"{t.name}.U"] for t in targets},
            V={t.name: tensors[f"{t.name}.V"] for t in targets},
            cores={t.name: tensors[f"{t.name}.{cores_key}"] for t in targets},
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
        for what, names in (("target", [t.name for t in self.targets]), ("adapter", self.names)):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"the bank lists {what} {name!r} twice; {what} names must be unique")
                seen.add(name)
        K, n, r = self.num_clusters, len(self.entries), self.rank
        for t in self.targets:
            want = {
                "U": (K, t.out_features, r),
                "V": (K, t.in_features, r),
                "cores": (n, r, r) if self.method == "jd-full" else (n, r),
            }
            for key, shape in want.items():
                got = tuple(getattr(self, key)[t.name].shape)
                if got != shape:
                    raise ValueError(f"bank tensor {t.name}.{key} has shape {got}, expected {shape}")
        target_names = {t.name for t in self.targets}
        for i, e in enumerate(self.entries):
            if e.index != i or not 0 <= e.cluster < K:
                raise ValueError(f"bank entry {e.name!r} has index {e.index} / cluster {e.cluster}; expected {i} / [0, {K})")
            extra = sorted(set(e.targets) - target_names)
            if extra:
                raise ValueError(f"bank entry {e.name!r} adapts target {extra[0]!r}, which the bank has no basis for")


def _upgrade(meta: dict, version: int) -> dict:
    """bank.json of an older format_version in the current names (version 1: `slots` → `targets`
    at the top, in every adapter and in stats). Only names change: the values are checked after."""
    old, new = _NAMES[version][0], _NAMES[FORMAT_VERSION][0]
    if old == new:
        return meta

    def rename(d):
        if not isinstance(d, dict) or old not in d or new in d:  # leave odd input to the checks
            return d
        return {new if k == old else k: v for k, v in d.items()}

    meta = dict(rename(meta))
    if isinstance(meta.get("adapters"), list):
        meta["adapters"] = [rename(e) for e in meta["adapters"]]
    if "stats" in meta:
        meta["stats"] = rename(meta["stats"])
    return meta


def _per_fit(history: dict, key: str) -> list:
    """history[key] (target → one value per cluster) flattened; other shapes (older banks, or a
    hand-edited bank.json: the history is not checked) give none."""
    per_target = history.get(key)
    if not isinstance(per_target, dict):
        return []
    return [x for per_cluster in per_target.values() if isinstance(per_cluster, list) for x in per_cluster]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _preview(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


# ------------------------------------------------------------------------- safe writes


def _backup(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{BACKUP_SUFFIX}"


def _swap(new: Path, dest: Path) -> None:
    """Replace the bank at `dest` by `new`; at every instant a bank is at `dest` or in its backup."""
    backup = _backup(dest)
    os.replace(dest, backup)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(backup, dest)  # if this fails too, `recover` puts the old bank back later
        raise
    shutil.rmtree(backup, ignore_errors=True)


def recover(bank_dir: str | os.PathLike) -> None:
    """Finish an overwrite killed mid-swap: restore the old bank from its backup, or drop a stale backup."""
    dest = Path(os.path.abspath(bank_dir))
    backup = _backup(dest)
    if len(os.fsencode(backup.name)) > 255 or not backup.is_dir():
        return
    if not dest.exists() and not dest.is_symlink():
        if (backup / META_NAME).is_file():
            os.replace(backup, dest)
    elif (dest / META_NAME).is_file():  # the new bank is in place: the backup is the old one
        shutil.rmtree(backup, ignore_errors=True)


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ValueError unless a bank may be written at `out_dir`: a new path, or an existing bank to overwrite."""
    dest = Path(os.path.abspath(out_dir))
    check_output_name(dest)
    recover(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"output directory already exists: {out_dir} (pass --overwrite to replace it, if it is a bank)")
    if not (dest.is_dir() and (dest / META_NAME).is_file()):
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
    "targets": list,
    "adapters": list,
    "dtype": str,
    "base_model_name_or_path": str | None,
    "target_modules": list[str],
    "history": dict,
}
_REQUIRED = ("method", "rank", "targets", "adapters")


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
