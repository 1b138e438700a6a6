"""The vLLM plugin: activated LoRA (`alora.py`) and a `LoRAResolver` that serves kilolora's
adapters and bank entries by name.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (pyproject.toml
registers `register` here). It does nothing unless `$KILOLORA_VLLM_CATALOG` names a catalog
(`kilolora serve --engine vllm` sets it), so installing kilolora into a vLLM venv changes no
other vLLM server. With it, a request for a model name vLLM does not know yet goes to the
registered resolvers (vllm/entrypoints/serve/engine/serving.py `_check_model`, which needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`); ours finds the name in the catalog, exports a bank entry
to its on-disk cache the first time, and returns the directory for vLLM to load
(vllm/lora/resolver.py, vllm/entrypoints/openai/models/serving.py `resolve_lora`).
"""

from __future__ import annotations

import asyncio
import os

from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from .catalog import CATALOG_ENV, Catalog

RESOLVER_NAME = "kilolora"


def register() -> None:
    """The entry point, in every vLLM process: activated LoRA (`alora.install`: on vLLM 0.32 only,
    a no-op for adapters without an invocation, and the fix of the CPU LoRA ops' `-1` index), then
    the resolver when a catalog is given (only the API server's is ever asked)."""
    from . import alora

    alora.install()
    path = os.environ.get(CATALOG_ENV)
    if not path:
        return
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, KiloloraResolver(Catalog.load(path)))


class KiloloraResolver(LoRAResolver):
    """Names in a `Catalog` → `LoRARequest`s for vLLM (bank entries exported on first use)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not self.catalog.has(lora_name):
            return None
        try:  # an export reads the bank and writes files: off the event loop
            path = await asyncio.to_thread(self.catalog.materialise, lora_name)
        except Exception:
            init_logger(__name__).exception("kilolora: could not materialise adapter %r", lora_name)
            raise
        # vLLM replaces lora_int_id with its own counter; it must only be positive here
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))
