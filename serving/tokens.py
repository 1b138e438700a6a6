"""`Tokens`, the one token-count type (no torch: the orchestrator's HTTP backend uses it too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Tokens:
    """Token accounting of one or more calls: the one count type of the engine, the server and
    the orchestrator's backends."""

    prefilled: int = 0
    """context tokens computed by a forward"""
    reused: int = 0
    """context tokens whose keys/values were already computed: the prefix cache's blocks (what an
    engine job's prefill found) and, for a call on a fork, the blocks it shares with its parent
    (the orchestrator's backends count those too)"""
    decoded: int = 0
    """tokens generated"""

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.prefilled + other.prefilled, self.reused + other.reused, self.decoded + other.decoded)

    @property
    def computed(self) -> int:
        return self.prefilled + self.decoded

    def as_dict(self) -> dict:
        return {"prefilled": self.prefilled, "reused": self.reused, "decoded": self.decoded}
