"""Serving: a compact Llama-family runner over a paged KV cache, dense and bank LoRA adapters
chosen per token (Triton kernels on CUDA, torch on CPU), and the continuous-batching engine.

    from serving import Engine, SamplingParams
    engine = Engine.from_pretrained("model_dir", bank="bank_dir", adapters={"math": "lora_dir"})
    out = engine.generate(["2+2="], adapter="math", params=SamplingParams(max_tokens=8, temperature=0))

The names below load on first use, so `serving.tokens` (what the orchestrator's HTTP backend
needs) imports without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Completion": "sequence", "Delta": "sequence", "Engine": "engine", "ModelConfig": "config",
            "SamplingParams": "sampling", "StructuredOutputsParams": "structured", "TokenLogprob": "sampling",
            "Tokens": "tokens"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
