"""GGUF files as served checkpoints: converted once, through transformers' own GGUF loader, into an
ordinary HF checkpoint directory (config.json, model.safetensors, tokenizer files with the chat
template, generation_config.json with the EOS ids), cached by the file's sha256.

transformers reads a GGUF with `from_pretrained(dir, gguf_file=name)` (it needs the `gguf`
package) and dequantizes the weights to float32; it also undoes llama.cpp's q/k row permutation,
which is why this module never reads GGUF tensors itself. The conversion takes a while (about
15 s of CPU for SmolLM2-135M, most of it transformers parsing metadata in Python), so it is done
once per file and reused: the cache directory is `$KILOLORA_CACHE/gguf/<sha256>` (default
`~/.cache/kilolora/gguf/<sha256>`), written to a temporary directory and renamed into place, so a
crash or a concurrent conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .config import ModelConfig

CACHE_ENV = "KILOLORA_CACHE"
MARKER = "kilolora_gguf.json"
"""written last into a converted directory: the source file, its sha256, the transformers version"""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted GGUF checkpoints live: `cache_dir`, else `$KILOLORA_CACHE/gguf`, else
    `~/.cache/kilolora/gguf`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return (Path(env) if env else Path.home() / ".cache" / "kilolora") / "gguf"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_checkpoint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF checkpoint directory converted from the GGUF file `path`: from the cache when this
    file (by sha256) was converted before, else converted now (and cached)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist or is not a file")
    root = cache_root(cache_dir)
    sha = sha256_file(path)
    out = root / sha
    if (out / MARKER).is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it: say so before it does)
    except ImportError as e:
        raise ImportError(f"loading the GGUF file {path} needs the `gguf` package: pip install gguf") from e
    t0 = time.perf_counter()
    with _parse_once():
        config = _read_config(path)  # refuses an architecture the engine does not serve, before the long part
        root.mkdir(parents=True, exist_ok=True)
        print(f"kilolora: converting {path.name} to a float32 checkpoint in {out} (once per file; this takes a while)",
              file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}.", suffix=".tmp", dir=root))
        try:
            _convert(path, config, tmp)
            (tmp / MARKER).write_text(json.dumps({"source": str(path), "sha256": sha,
                                                 "transformers": _transformers_version()}, indent=2) + "\n")
            try:
                tmp.rename(out)  # atomic; fails when another process renamed its conversion there first
            except OSError:
                if not (out / MARKER).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    print(f"kilolora: converted {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def _read_config(path: Path):
    """The transformers config of a GGUF file (its metadata only), refused unless the engine serves it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        ModelConfig.from_hf(config.to_dict())
    except ValueError as e:  # transformers' "architecture ... is not supported", or the engine's refusal
        raise ValueError(f"GGUF file {path} cannot be served: {e}") from e
    return config


def _convert(path: Path, config, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, config=config, dtype=torch.float32)

    # save_pretrained refuses a model loaded through the GGUF quantizer, although its weights are
    # plain float32 by now: write the checkpoint's parts directly.
    hf = model.config.to_dict()  # every field, not the diff against transformers' defaults: the engine has its own
    for key in ("quantization_config", "_name_or_path"):  # the GGUF loading, not the checkpoint
        hf.pop(key, None)
    hf["architectures"] = [type(model).__name__]
    hf["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    state = model.state_dict()
    if hf.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # shares the embedding's storage; safetensors refuses aliases
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _parse_once():
    """transformers' GGUF loading repeats pure, slow work; memoize it while a conversion runs (about a
    third of its CPU time for SmolLM2): it parses the whole file's metadata in Python for the config,
    again for the tokenizer and again for the weights (~5 s each with a 49k-token vocabulary), and
    builds gguf's tensor-name map once per module of the model (~400 times for 30 layers). Both
    `GGUFReader` (read-only use of a memory map) and `get_tensor_name_map(arch, n_blocks)` depend on
    their arguments only; transformers imports them from `gguf` at call time."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}

    def read_once(path, mode="r"):
        key = f"{os.path.realpath(path)}:{mode}"
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
