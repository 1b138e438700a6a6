"""Fixtures of the server suites (tests/serving/test_server_*.py): the suite-wide `kilolora serve`
subprocess, an `openai` client and a raw HTTP client on it, and the same world in process as the
reference. Their helpers are in server_helpers.py."""

from __future__ import annotations

import pytest

# Nothing heavier than pytest at import: the kernel tests in this directory run on GPU machines
# with neither the clients nor pydantic (benchmarks/gpu_check.sh); the fixtures import what they use.


@pytest.fixture(scope="module")
def server(world_server):
    """`kilolora serve` in a subprocess (tests/conftest.py), shared with the other suites."""
    return world_server


@pytest.fixture(scope="module")
def client(server):
    import openai  # inside: the kernel tests share this directory and run where no client is installed

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    import httpx2 as httpx

    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def engine():
    """The same world in process: the reference for greedy text, token counts and logprobs."""
    from tests.serving.server_helpers import WORLD

    return WORLD.engine(kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def tok():
    from tests.serving.server_helpers import WORLD

    return WORLD.tokenizer()
