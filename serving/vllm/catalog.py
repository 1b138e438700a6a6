"""What a vLLM server launched by kilolora serves: adapter names → PEFT directories vLLM can load.

`kilolora serve --engine vllm` writes a `Catalog` (JSON) and hands its path to the vLLM processes
in `$KILOLORA_VLLM_CATALOG`; the resolver plugin (`plugin.py`) reads it there. Three sources:

- plain PEFT directories (the world's skills, `--adapter NAME=DIR`), served from where they lie;
- activated adapters (aLoRA: peft's `alora_invocation_tokens`): served as they are where the vLLM
  runs kilolora's aLoRA patches (`alora.py`, vLLM 0.32: `activated`); on another vLLM, which
  refuses them ("vLLM does not support Activated LoRA"), *stripped*, as copies whose config drops
  the invocation, so they apply to the whole prompt (the world's tools/agent accuracy then falls
  from 1.00 to 0.15);
- bank entries, exported on first use (never all up front) as dense PEFT directories of the
  bank's rank, `lora_A = Vᵀ`, `lora_B = U Σ_i` in float32 (vLLM casts to its `--lora-dtype`),
  cached under `CACHE/bank-<sha256 of the bank's tensors>/NAME`, so a rewritten bank never
  serves stale exports.

`base:NAME` means NAME, as in kilolora's own server. Nothing here imports vLLM or torch until a
bank entry is exported (`compression` then).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

CATALOG_ENV = "KILOLORA_VLLM_CATALOG"
"""the path of the catalog JSON, set for the vLLM processes"""
FORMAT = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class Catalog:
    """Names a kilolora-launched vLLM server resolves, and where their PEFT directories come from."""

    base: str = "base"
    """the base model's served name (`base:NAME` is NAME)"""
    adapters: dict[str, str] = field(default_factory=dict)
    """name → a PEFT directory vLLM can load as it is (stripped copies of activated adapters)"""
    banks: list[str] = field(default_factory=list)
    """bank directories; the first holding a name serves it"""
    cache: str = ""
    """where bank exports and stripped copies are written"""
    activated: bool = False
    """the vLLM serves activated adapters (kilolora's aLoRA patches): bank entries keep their
    invocation; else they are exported stripped"""

    def __post_init__(self):
        self._banks: dict[str, object] = {}
        self._names: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------- file
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"format": FORMAT, **asdict(self)}, indent=1, sort_keys=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(body)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Catalog:
        d = json.loads(Path(path).read_text())
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a kilolora vLLM catalog of format {FORMAT}")
        return cls(**d)

    # --------------------------------------------------------------------- lookup
    def canonical(self, name: str) -> str:
        prefix = self.base + ":"
        return name[len(prefix):] if name.startswith(prefix) else name

    def bank_names(self, bank_dir: str) -> set[str]:
        """Entry names of a bank, from its bank.json (no tensors read)."""
        if bank_dir not in self._names:
            meta = json.loads((Path(bank_dir) / "bank.json").read_text())
            self._names[bank_dir] = {a["name"] for a in meta["adapters"]}
        return self._names[bank_dir]

    def has(self, name: str) -> bool:
        name = self.canonical(name)
        return name in self.adapters or any(name in self.bank_names(b) for b in self.banks)

    def materialise(self, name: str) -> Path | None:
        """The PEFT directory serving `name` (exporting a bank entry on first use), or None if
        no source holds it."""
        name = self.canonical(name)
        if name in self.adapters:
            return Path(self.adapters[name])
        for b in self.banks:
            if name in self.bank_names(b):
                return self._export(b, name)
        return None

    def _export(self, bank_dir: str, name: str) -> Path:
        meta = json.loads((Path(bank_dir) / "bank.json").read_text())
        kind = "" if self.activated else "-plain"  # an entry's export with its invocation, or stripped
        out = Path(self.cache) / f"bank-{meta['tensors_sha256'][:16]}{kind}" / _dir_name(name)
        if (out / CONFIG_NAME).is_file():
            return out
        with self._lock:  # one bank in memory per process, loaded once
            if (out / CONFIG_NAME).is_file():
                return out
            bank = self._banks.get(bank_dir)
            if bank is None:
                from compression import Bank

                bank = self._banks[bank_dir] = Bank.load(bank_dir)
            export_dense(bank, name, out, activated=self.activated)
        return out


def export_dense(bank, name: str, out: Path, activated: bool = False) -> Path:
    """Write bank entry `name` as a float32 PEFT directory of the bank's rank (scaling 1), with
    its invocation when `activated` (else without: a vLLM without the aLoRA patches refuses it).
    Atomic: another process racing on the same directory leaves one complete copy."""
    import torch

    from compression.peft_io import save_adapter

    e = bank.entry(name)
    lora_A, lora_B = bank.factors(name)
    config = {k: v for k, v in e.config.items() if activated or k != "alora_invocation_tokens"}
    config.setdefault("base_model_name_or_path", bank.base_model_name_or_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_adapter(out, lora_A, lora_B, config, dtype=torch.float32)
    except ValueError:
        if not (out / CONFIG_NAME).is_file():  # not the race "already exists": a real error
            raise
    return out


def read_config(adapter_dir: str | os.PathLike) -> dict:
    p = Path(adapter_dir) / CONFIG_NAME
    if not p.is_file():
        raise ValueError(f"{adapter_dir}: not a PEFT adapter directory (no {CONFIG_NAME})")
    return json.loads(p.read_text())


def adapter_rank(config: dict) -> int:
    """The largest rank a PEFT config declares (`r` and its `rank_pattern`)."""
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r", 8)), *map(int, pattern.values())])


def is_activated(config: dict) -> bool:
    return bool(config.get("alora_invocation_tokens"))


def plain_copy(adapter_dir: str | os.PathLike, cache: str | os.PathLike) -> Path:
    """An activated adapter stripped to a plain LoRA: its weights, a config without
    `alora_invocation_tokens`; cached by the source's config and weights (path, size, mtime)."""
    src = Path(adapter_dir).resolve()
    config_bytes = (src / CONFIG_NAME).read_bytes()
    st = (src / WEIGHTS_NAME).stat()
    key = hashlib.sha256(config_bytes + f"\0{src}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache) / f"plain-{key}" / _dir_name(src.name)
    if (out / CONFIG_NAME).is_file():
        return out
    config = json.loads(config_bytes)
    config.pop("alora_invocation_tokens", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            os.link(src / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        except OSError:  # another file system
            shutil.copyfile(src / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        try:
            os.rename(tmp, out)
        except OSError:  # a concurrent launcher wrote it first
            if not (out / CONFIG_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dir_name(name: str) -> str:
    """`name` when it is a safe file name, else its sha256 (names may hold `/` or `..`)."""
    return name if _SAFE_NAME.fullmatch(name) and ".." not in name else hashlib.sha256(name.encode()).hexdigest()
