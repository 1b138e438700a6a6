"""Shared fixtures: tiny random HF Llama models and real PEFT adapters made with `peft`."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when serving.kernels
# is imported: set it before any test module imports it, so the kernels run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def world_server(tmp_path_factory):
    """`kilolora serve` on the embedded world, a real subprocess on a free local port; yields its
    base URL (`http://127.0.0.1:PORT`, the OpenAI API under `/v1`). At the session's end it is
    stopped, and its log must hold no traceback: a 500 anywhere in the suite fails it."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = _free_port()
    exe = Path(sys.executable).with_name("kilolora")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = tmp_path_factory.mktemp("world_server") / "serve.log"  # a file: a full pipe would block the server
    with open(log, "w") as f:
        proc = subprocess.Popen([str(exe), "serve", "--port", str(port)], env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kilolora serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kilolora serve did not answer /health in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), f"kilolora serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]
