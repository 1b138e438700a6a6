"""A world on disk: base model, tokenizer, skill adapters, the task bank, and its manifest.

```
world.json            format, build settings, skills (specs), tasks, build time, eval at build
base/                 HF checkpoint: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
skills/<name>/        PEFT adapters of the built-in skills (verifier, tool_selector, self_eval)
bank/                 the task family compressed into one shared-basis bank (compression/)
adapters/<task>/      the uncompressed task family (written by a build, not shipped: large)
```

The embedded default world ships in the package (`skills/default_world/`), so everything runs
with no download; `kilolora world build` rebuilds it from a seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .spec import Skill

FORMAT_VERSION = 1
MANIFEST = "world.json"
DEFAULT_WORLD = Path(__file__).parent / "default_world"


@dataclass
class World:
    """A loaded world manifest with its directory."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> World:
        """Read a world directory (default: the embedded one)."""
        path = Path(path) if path is not None else DEFAULT_WORLD
        f = path / MANIFEST
        if not f.is_file():
            hint = " (the embedded world is missing: run `kilolora world build --out skills/default_world`)" \
                if path == DEFAULT_WORLD else ""
            raise FileNotFoundError(f"{path} is not a kilolora world: no {MANIFEST}{hint}")
        manifest = json.loads(f.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{f}: world format {manifest.get('format')!r}, this kilolora reads {FORMAT_VERSION}")
        return cls(path, manifest)

    @property
    def base_dir(self) -> Path:
        return self.path / "base"

    @property
    def bank_dir(self) -> Path:
        return self.path / "bank"

    @property
    def adapters_dir(self) -> Path:
        return self.path / "adapters"

    def skills(self, role: str | None = None) -> list[Skill]:
        out = [Skill.model_validate(s) for s in self.manifest["skills"]]
        return [s for s in out if role is None or s.role == role]

    def skill(self, name: str) -> Skill:
        for s in self.skills():
            if s.name == name:
                return s
        raise KeyError(f"no skill {name!r} in {self.path}; skills: {[s.name for s in self.skills()][:8]}...")

    def skill_dir(self, name: str) -> Path:
        return self.path / "skills" / name

    @property
    def tasks(self) -> list[dict]:
        """The task family: name, family, arg, role (task or verifier) of each bank adapter."""
        return self.manifest["tasks"]

    def has_uncompressed(self) -> bool:
        return all((self.adapters_dir / t["name"]).is_dir() for t in self.tasks)

    def engine(self, *, uncompressed: bool = False, bank: bool = True, bank_dir: str | os.PathLike | None = None,
               **engine_kw):
        """An `Engine` serving the base, the built-in skills (dense) and the task bank (bank
        entries under their task names; with `uncompressed`, the original adapters as `full/<task>`).
        `bank_dir`: serve that bank instead of the world's own (a sweep's candidates)."""
        from serving.engine import Engine

        in_bank = {t["name"] for t in self.tasks}
        skill_dirs = {s.name: self.skill_dir(s.name) for s in self.skills() if s.name not in in_bank}
        chosen = (Path(bank_dir) if bank_dir is not None else self.bank_dir) if bank else None
        eng = Engine.from_pretrained(self.base_dir, bank=chosen, adapters=skill_dirs, **engine_kw)
        if uncompressed:
            for t in self.tasks:
                eng.load_adapter("full/" + t["name"], self.adapters_dir / t["name"])
        return eng

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.base_dir))


def default_world() -> World:
    return World.load(DEFAULT_WORLD)
