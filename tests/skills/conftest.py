"""Fixtures of the skills tests: one quick world, built once per session by the real CLI."""

from __future__ import annotations

import pytest

from skills.world import World
from tests.orchestrator.test_cli import kilolora


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory):
    """`kilolora world build --quick --seed 1` (a subprocess, seconds). Read-only: a test that
    changes a world works on a copy."""
    out = tmp_path_factory.mktemp("w") / "world"
    proc = kilolora("world", "build", "--quick", "--out", out, "--seed", 1)
    assert "built" in proc.stderr and "base model" in proc.stderr  # the progress bars went to stderr
    return World.load(out)
