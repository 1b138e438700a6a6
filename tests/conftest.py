"""Shared fixtures: tiny random HF Llama models and real PEFT adapters made with `peft`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when serving.kernels
# is imported: set it before any test module imports it, so the kernels run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The vLLM suites run in their own venv (scripts/test-vllm.sh): without vllm only their launcher
# tests (no server) are collected, the rest not even as skips.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else \
    [f"vllm/{p.name}" for p in (Path(__file__).parent / "vllm").glob("test_*.py") if p.name != "test_launch.py"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama checkpoint (hidden 32, GQA 4/2 heads) saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def world_server(tmp_path_factory):
    """`kilolora serve` on the embedded world, a real subprocess on a free local port; yields its
    base URL (`http://127.0.0.1:PORT`, the OpenAI API under `/v1`). At the session's end it is
    stopped, and its log must hold no traceback: a 500 anywhere in the suite fails it."""
    from tests.helpers import kilolora_server

    with kilolora_server(["--allow-adapter-updates"], tmp_path_factory.mktemp("world_server") / "serve.log") as url:
        yield url
