"""PEFT LoRA adapters in and out, and a validated collection of them.

An adapter is read from a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`).
Its scaling (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, per-module
overrides from `alpha_pattern`) is folded into `lora_B`, so that for every target
`ΔW = lora_B @ lora_A` and adapters of different rank and alpha compress together.

A *target* is one adapted linear layer (a module that peft's `target_modules` matched), named
by its PEFT key prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`; its tensors
are `<target>.lora_A.weight` (r, in_features) and `<target>.lora_B.weight` (out_features, r).

Pickled weights (`adapter_model.bin`) are never loaded: they can run code on load.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8
"""peft.LoraConfig's default lora_alpha, which applies when a config file omits it."""
PEFT_DEFAULT_R = 8
"""peft.LoraConfig's default r, which applies when a config file omits it."""
MAX_CONFIG_BYTES = 1 << 20
"""A larger adapter_config.json is refused unread (peft writes a few kB)."""
MAX_RANK = 1 << 16
MAX_ALPHA = 1e6
"""`r` and `lora_alpha` (and their `rank_pattern` / `alpha_pattern` values) above these are refused."""
MAX_NORM = 2.0**50
"""Bound on ‖lora_A‖_F, ‖lora_B‖_F (scaled) and their product, which bounds every |ΔW_ij|: the
fit squares ΔW and sums the squares over a collection, and that must stay finite in float32."""
MAX_NAME_BYTES = 230
"""Longest output directory name: 255 (the usual file system limit) less room for the hidden
temporary and backup names written beside it."""


@dataclass(frozen=True)
class TargetInfo:
    """One adapted linear layer (a target): its PEFT key prefix and its shape."""

    name: str
    in_features: int
    out_features: int


@dataclass
class LoraAdapter:
    """A LoRA adapter held as per-target factors with the scaling folded into `lora_B`."""

    name: str
    """Unique name in a collection (the directory name by default)."""
    config: dict
    """`adapter_config.json` as read; kept so exports carry the original metadata."""
    lora_A: dict[str, torch.Tensor]
    """target -> (r, in_features)"""
    lora_B: dict[str, torch.Tensor]
    """target -> (out_features, r), already multiplied by the scaling"""
    dtype: torch.dtype = torch.float32
    """dtype the weights were stored in."""
    path: Path | None = None

    @property
    def targets(self) -> dict[str, TargetInfo]:
        return {t: TargetInfo(t, a.shape[1], self.lora_B[t].shape[0]) for t, a in self.lora_A.items()}

    @property
    def r(self) -> int:
        return int(self.config.get("r", max(a.shape[0] for a in self.lora_A.values())))

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", PEFT_DEFAULT_ALPHA))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def alora_invocation_tokens(self) -> list[int] | None:
        return self.config.get("alora_invocation_tokens")

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def delta(self, target: str) -> torch.Tensor:
        """The dense update ΔW = B A of one target, (out_features, in_features). Small shapes only."""
        return self.lora_B[target].float() @ self.lora_A[target].float()

    def num_parameters(self) -> int:
        return sum(a.numel() + self.lora_B[s].numel() for s, a in self.lora_A.items())


def module_name(target: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj`."""
    return target[len(_PEFT_PREFIX) :] if target.startswith(_PEFT_PREFIX) else target


def _pattern_value(patterns: dict, target: str, default):
    # Same matching rule as peft.utils.other.get_pattern_key.
    name = module_name(target)
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_scaling(config: dict, target: str, r: int) -> float:
    """The factor peft multiplies `lora_B @ lora_A` by for this target."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), target, config.get("lora_alpha", PEFT_DEFAULT_ALPHA)))
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def _read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{path}: not a PEFT adapter directory (no {CONFIG_NAME})")
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:  # stat first: never read an unbounded file
        raise ValueError(f"{cfg_path}: {size} bytes; an {CONFIG_NAME} may have at most {MAX_CONFIG_BYTES} (1 MiB)")
    with open(cfg_path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)  # the file may have grown since the stat
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_path}: more than {MAX_CONFIG_BYTES} bytes; an {CONFIG_NAME} may have at most 1 MiB")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported")
    _check_config(config, cfg_path)
    return config


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_rank(value, field: str, where) -> None:
    if not _is_int(value) or not 1 <= value <= MAX_RANK:
        raise ValueError(f"{where}: {field} must be an integer in [1, {MAX_RANK}]; got {value!r}")


def _check_alpha(value, field: str, where) -> None:
    # `not 0 < x` also refuses NaN; json.loads reads Infinity and NaN as floats.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_ALPHA:
        raise ValueError(f"{where}: {field} must be a number in (0, {MAX_ALPHA:g}]; got {value!r}")


def _check_config(config: dict, where: Path) -> None:
    """Refuse values the loader would turn into wrong, non-finite or unusable adapters."""
    _check_rank(config.get("r", PEFT_DEFAULT_R), "r", where)
    _check_alpha(config.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha", where)
    for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise ValueError(f"{where}: {field} must be an object (module pattern -> value); got {patterns!r}")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{where}: {field} key {key!r} is not a valid regular expression ({e})") from None
            check(value, f"{field}[{key!r}]", where)
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{where}: use_rslora must be true or false; got {config['use_rslora']!r}")
    tokens = config.get("alora_invocation_tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(_is_int(t) and t >= 0 for t in tokens)):
        raise ValueError(f"{where}: alora_invocation_tokens must be a list of token ids (integers >= 0); got {tokens!r}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise ValueError(f"{where}: target_modules must be a string or a list of strings; got {targets!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{where}: base_model_name_or_path must be a string; got {base!r}")


def _check_magnitudes(where: Path, target: str, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype) -> None:
    """Refuse factors whose ΔW = b @ a could overflow: |ΔW_ij| <= ‖ΔW‖_F <= ‖a‖_F ‖b‖_F (Cauchy–Schwarz).

    `b` is scaled. The bound is the range of `dtype`, the dtype the weights are stored and
    served in (float16: 65504), or MAX_NORM, whichever is smaller; norms are taken in float64
    so that the check itself cannot overflow.
    """
    limit = min(torch.finfo(dtype).max, MAX_NORM)
    na, nb = float(torch.linalg.vector_norm(a.double())), float(torch.linalg.vector_norm(b.double()))
    if not max(na, nb, na * nb) <= limit:  # NaN and inf fail too
        raise ValueError(
            f"{where}: target {target!r}: ‖lora_A‖_F = {na:.3g} and ‖lora_B‖_F × scaling ({scaling:.3g}) = {nb:.3g}, "
            f"so ΔW = lora_B @ lora_A could overflow {str(dtype).removeprefix('torch.')}; each norm and their "
            f"product must be at most {limit:.3g}"
        )


def load_adapter(path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory; validate shapes and values; fold the scaling into `lora_B`."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter directory not found: {path}")
    config = _read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [path / p for p in PICKLE_NAMES if (path / p).is_file()]
        if pickles:
            raise ValueError(
                f"{pickles[0]}: pickle weights are refused (loading them can run arbitrary code); "
                f"convert the adapter to {WEIGHTS_NAME}"
            )
        raise ValueError(f"{path}: no {WEIGHTS_NAME}")

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{weights}: corrupt safetensors file ({e})") from None

    lora_A, lora_B = {}, {}
    for key, t in tensors.items():
        if key.endswith(_A_SUFFIX):
            lora_A[key[: -len(_A_SUFFIX)]] = t
        elif key.endswith(_B_SUFFIX):
            lora_B[key[: -len(_B_SUFFIX)]] = t
        else:
            raise ValueError(
                f"{weights}: unsupported tensor {key!r}; only lora_A/lora_B weights of linear "
                "layers are supported (no embeddings, DoRA magnitudes, biases or modules_to_save)"
            )
        if not t.is_floating_point():
            raise ValueError(f"{weights}: tensor {key!r} has non-float weights ({t.dtype})")
    if not lora_A:
        raise ValueError(f"{weights}: no LoRA weights found")
    if set(lora_A) != set(lora_B):
        missing = sorted(set(lora_A) ^ set(lora_B))[0]
        raise ValueError(f"{weights}: target {missing!r} has only one of lora_A / lora_B")

    dtype = next(iter(lora_A.values())).dtype
    for target in sorted(lora_A):
        a, b = lora_A[target], lora_B[target]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights}: target {target!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, in_features) and (out_features, r)"
            )
        # peft scales by the configured rank, not the tensors': they must agree.
        pattern_r = _pattern_value(config.get("rank_pattern"), target, None)
        want = pattern_r if pattern_r is not None else config.get("r", PEFT_DEFAULT_R)
        if a.shape[0] != want:
            field = "rank_pattern" if pattern_r is not None else "r" if "r" in config else "r (peft's default)"
            raise ValueError(
                f"{weights}: target {target!r} has rank {a.shape[0]} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) "
                f"but {CONFIG_NAME} gives it {field} = {want}"
            )
        narrowest = min((dtype, a.dtype, b.dtype), key=lambda d: torch.finfo(d).max)
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{weights}: target {target!r} has NaN or Inf weights")
        scaling = lora_scaling(config, target, a.shape[0])
        b = b * scaling
        _check_magnitudes(weights, target, a, b, scaling, narrowest)
        lora_A[target] = a
        lora_B[target] = b
    return LoraAdapter(name or path.name, config, lora_A, lora_B, dtype=dtype, path=path)


def save_adapter(
    path: str | os.PathLike,
    lora_A: dict[str, torch.Tensor],
    lora_B: dict[str, torch.Tensor],
    config: dict,
    dtype: torch.dtype = torch.float32,
    lora_alpha: float | None = None,
) -> Path:
    """Write a PEFT directory whose scaled `lora_B @ lora_A` equals the given (scaled) factors.

    `config` is a template (usually the original adapter's); rank and alpha are rewritten so
    that peft's scaling is exactly 1 for every target, or, with `lora_alpha` (one rank only),
    `lora_B` is stored divided by `lora_alpha / r`. Written to a temp dir, then renamed.
    """
    path = Path(path)
    check_output_name(path)
    if path.exists() or path.is_symlink():
        raise ValueError(f"output directory already exists: {path}")
    ranks = {s: a.shape[0] for s, a in lora_A.items()}
    r = max(ranks.values())
    cfg = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern")}
    cfg.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={}, peft_type="LORA")
    odd = {module_name(s): k for s, k in ranks.items() if k != r}
    scaling = 1.0
    if lora_alpha is not None:
        if odd:
            raise ValueError("lora_alpha can only be set when every target has the same rank")
        cfg["lora_alpha"], scaling = lora_alpha, lora_alpha / r
    if odd:  # per-module rank with alpha = rank keeps scaling 1
        cfg["rank_pattern"] = {re.escape(m): k for m, k in odd.items()}
        cfg["alpha_pattern"] = {re.escape(m): k for m, k in odd.items()}
    tensors = {}
    for s in lora_A:
        tensors[s + _A_SUFFIX] = lora_A[s].to(dtype).contiguous()
        tensors[s + _B_SUFFIX] = (lora_B[s] / scaling).to(dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=list))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_output_name(path: Path) -> None:
    """Refuse an output name the file system would refuse once a temporary prefix is added."""
    n = len(os.fsencode(path.name))
    if n > MAX_NAME_BYTES:
        raise ValueError(f"output name {path.name[:32]}... is {n} bytes long; at most {MAX_NAME_BYTES} are supported")


def find_adapter_dirs(inputs: list[str]) -> list[Path]:
    """Expand CLI inputs: adapter directories, globs, or directories of adapter directories."""
    found: list[Path] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item))
            dirs = [p for p in matches if (p / CONFIG_NAME).is_file()]
            if not dirs:
                raise ValueError(f"no PEFT adapter directories match {item!r}")
            found += dirs
            continue
        p = Path(item)
        if not p.is_dir():
            raise ValueError(f"adapter directory not found: {item}")
        if (p / CONFIG_NAME).is_file():
            found.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / CONFIG_NAME).is_file())
        if not children:
            raise ValueError(f"{item}: not a PEFT adapter directory and contains none")
        found += children
    if not found:
        raise ValueError("no adapter directories given")
    return found


@dataclass
class Collection:
    """Validated adapters over a common set of targets, with their factors stacked per target.

    The collection owns the factors: on construction each adapter's tensors are copied into
    one zero-padded stack per target and replaced by views of it, so a collection of 1000
    adapters is held in memory once, not twice. Treat the stacks as read-only.
    """

    adapters: list[LoraAdapter]
    targets: list[TargetInfo] = field(default_factory=list)
    _stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not self.adapters:
            raise ValueError("a collection needs at least one adapter")
        names = [a.name for a in self.adapters]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"two adapters are named {dup!r}; adapter names must be unique")
        self.targets = union_targets(self.adapters)
        bases = {a.base_model_name_or_path for a in self.adapters}
        if len(bases) > 1:
            warnings.warn(f"adapters name different base models: {sorted(map(str, bases))}", stacklevel=2)
        self._stacks = {info.name: self._stack(info) for info in self.targets}

    def _stack(self, info: TargetInfo) -> tuple[torch.Tensor, torch.Tensor]:
        target, n = info.name, len(self.adapters)
        r_max = max(a.lora_A[target].shape[0] if target in a.lora_A else 0 for a in self.adapters)
        A = torch.zeros(n, r_max, info.in_features)
        B = torch.zeros(n, info.out_features, r_max)
        for i, ad in enumerate(self.adapters):
            if target in ad.lora_A:
                r = ad.lora_A[target].shape[0]
                A[i, :r] = ad.lora_A[target]
                B[i, :, :r] = ad.lora_B[target]
                ad.lora_A[target], ad.lora_B[target] = A[i, :r], B[i, :, :r]
        return A, B

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def factors(self, target: str, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked, zero-padded factors of one target: A (n, r_max, d_in), B (n, d_out, r_max).

        An adapter that does not adapt this target contributes zeros (ΔW = 0).
        """
        A, B = self._stacks[target]
        return A.to(device), B.to(device)


def union_targets(adapters: list[LoraAdapter]) -> list[TargetInfo]:
    """All targets any adapter adapts, checking that every adapter agrees on each target's shape."""
    seen: dict[str, tuple[TargetInfo, str]] = {}
    for ad in adapters:
        for t, info in ad.targets.items():
            if t in seen and seen[t][0] != info:
                first, owner = seen[t]
                raise ValueError(
                    f"adapter {ad.name!r} target {t!r} has shape "
                    f"(out={info.out_features}, in={info.in_features}) but adapter {owner!r} has "
                    f"(out={first.out_features}, in={first.in_features})"
                )
            seen.setdefault(t, (info, ad.name))
    return [seen[t][0] for t in sorted(seen, key=_natural_key)]


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def adapter_names(dirs: list[Path]) -> list[str]:
    """Directory names, or paths below the common parent where names repeat (`runs/*/adapter`)."""
    seen: dict[Path, Path] = {}
    for d in dirs:
        if d.resolve() in seen:
            raise ValueError(f"adapter directory {d} is given twice (also as {seen[d.resolve()]})")
        seen[d.resolve()] = d
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    root = Path(os.path.commonpath([d.resolve() for d in dirs]))
    rel = [d.resolve().relative_to(root) for d in dirs]
    return [r.as_posix() if r != Path(".") else d.name for r, d in zip(rel, dirs)]


def load_collection(inputs: list[str | os.PathLike], progress=None) -> Collection:
    """Load every adapter the inputs name (see `find_adapter_dirs`) into a validated collection."""
    dirs = find_adapter_dirs([str(i) for i in inputs])
    adapters = []
    for d, name in zip(dirs, adapter_names(dirs)):
        adapters.append(load_adapter(d, name))
        if progress is not None:
            progress(1)
    return Collection(adapters)
