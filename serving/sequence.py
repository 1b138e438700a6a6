"""Per-sequence state of the engine: tokens, the adapter each token is computed with, blocks, jobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import BASE, AdapterInfo
from .sampling import SamplingParams, TokenLogprob


@dataclass
class Counters:
    """Token accounting of one request."""

    prefilled: int = 0
    """context tokens computed by a forward"""
    cached: int = 0
    """context tokens whose keys/values came from the prefix cache"""
    decoded: int = 0
    """tokens generated"""

    def as_dict(self) -> dict:
        return {"prefilled": self.prefilled, "cached": self.cached, "decoded": self.decoded}


@dataclass
class Completion:
    """The result of generating on one sequence."""

    seq: int
    """the sequence generated on (closed already when it came from `Engine.generate`)"""
    token_ids: list[int]
    text: str | None
    """decoded output, cut before a stop string (None without a tokenizer)"""
    finish_reason: str
    """`stop` (end-of-sequence, stop token or stop string), `length`, or `error`"""
    stop_reason: str | int | None = None
    """the stop string or stop token that ended it"""
    logprobs: list[TokenLogprob] | None = None
    counters: Counters = field(default_factory=Counters)
    adapter: str | None = None
    error: str | None = None


@dataclass
class Delta:
    """What one step added to a streamed request."""

    seq: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finished: Completion | None = None


@dataclass
class GenJob:
    params: SamplingParams
    generator: torch.Generator
    start: int
    """length of the sequence when the job began: output = tokens[start:]"""
    counters: Counters = field(default_factory=Counters)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pending: int = 0
    """trailing sampled tokens not yet computed (counted as decoded, not prefilled)"""
    emitted_tokens: int = 0
    emitted_text: int = 0
    result: Completion | None = None


@dataclass
class ScoreJob:
    logits_from: int
    """first position whose next-token log-probability is wanted"""
    counters: Counters = field(default_factory=Counters)
    scores: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None


@dataclass
class Seq:
    id: int
    tokens: list[int]
    adapters: list[int]
    """uid each token is (to be) computed with; BASE = -1"""
    adapter: AdapterInfo | None = None
    alora_start: int | None = None
    """activated adapter: first position it applies to (start of the last invocation)"""
    blocks: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    """prefix-cache key of every full computed block"""
    num_computed: int = 0
    job: GenJob | ScoreJob | None = None
    owned: bool = False
    """created by generate()/score(): closed by the engine when its job ends"""
    arrival: int = 0
    group: object = None
    """fair-scheduling group (e.g. one HTTP request's sequences); None: a group of its own"""

    def uid_at(self, pos: int) -> int:
        a = self.adapter
        if a is None:
            return BASE
        if a.activated and (self.alora_start is None or pos < self.alora_start):
            return BASE
        return a.uid

    def logits_from(self) -> int:
        """First position whose logits the job needs (it must be computed, not cached)."""
        if isinstance(self.job, ScoreJob):
            return self.job.logits_from
        return len(self.tokens) - 1

    def need_end(self) -> int:
        """Positions below this must be computed; a score never needs its last token's keys."""
        return len(self.tokens) - 1 if isinstance(self.job, ScoreJob) else len(self.tokens)


def find_last(tokens: list[int], pattern: list[int]) -> int | None:
    """Start of the last occurrence of `pattern` in `tokens` (peft's aLoRA activation rule)."""
    n = len(pattern)
    for i in range(len(tokens) - n, -1, -1):
        if tokens[i: i + n] == pattern:
            return i
    return None
