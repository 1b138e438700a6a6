"""Sampling parameters and a batched sampler with per-request reproducible randomness.

Randomness comes from the exponential race (Gumbel-max): token = argmax(p / E) with E ~ Exp(1)
drawn from the request's own generator, so a seeded request samples the same tokens whatever
else shares its batch. Top-k, top-p and temperature are applied row-wise in one pass. Reported
log-probabilities are those of the model's own distribution (log-softmax of the raw logits).

Degenerate settings mean what they say rather than produce garbage: a temperature below
`GREEDY_EPS` is greedy (dividing by it would overflow float32, as vLLM also treats it), a top_p
too small for float32 keeps the most likely token alone, a top_k at or over the vocabulary keeps
all. A row whose logits are not finite is reported (`sample` raises `NonFiniteLogits` naming the
rows) so that the engine fails that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-5
"""temperatures below this are greedy (vLLM's `_SAMPLING_EPS`)"""


class NonFiniteLogits(ValueError):
    """Some rows' logits hold NaN or Inf; `rows` are their indices in the batch."""

    def __init__(self, rows: list[int]):
        super().__init__(f"the model produced non-finite logits for batch rows {rows[:8]}")
        self.rows = rows


@dataclass
class SamplingParams:
    """How one request samples and when it stops."""

    max_tokens: int = 16
    """most new tokens to generate"""
    temperature: float = 1.0
    """0 is greedy"""
    top_p: float = 1.0
    """keep the smallest set of tokens whose probability reaches top_p"""
    top_k: int = 0
    """keep the k most likely tokens; 0 keeps all"""
    seed: int | None = None
    """per-request seed: the same seed gives the same tokens"""
    stop: list[str] = field(default_factory=list)
    """stop strings; the output text ends before the first one found"""
    stop_token_ids: list[int] = field(default_factory=list)
    """tokens that end the request (kept in the output)"""
    ignore_eos: bool = False
    """keep going past the model's end-of-sequence token"""
    logprobs: int | None = None
    """None: no logprobs; 0: the sampled token's; k: also the top-k alternatives"""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and the top alternatives at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row of `logits` (B, V) under each row's params; returns (B,) int64."""
    b, vocab = logits.shape
    bad = ~torch.isfinite(logits).all(-1)  # (B,)
    if bool(bad.any()):
        raise NonFiniteLogits(bad.nonzero()[:, 0].tolist())
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.all()):
        return logits.argmax(-1)
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
    x = logits / temp[:, None]  # (B, V)
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # k >= vocab keeps all
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V)
        keep = torch.ones_like(sorted_x, dtype=torch.bool)
        ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=x.device)
        keep &= torch.arange(vocab, device=x.device)[None] < ks[:, None]
        ps = torch.tensor(top_p, device=x.device, dtype=torch.float32)
        probs = sorted_x.float().softmax(-1)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        keep &= (probs.cumsum(-1) - probs) < ps[:, None]
        keep[:, 0] = True  # a top_p that float32 rounds to 0 still keeps the most likely token
        sorted_x = sorted_x.masked_fill(~keep, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    probs = x.float().softmax(-1)  # (B, V)
    noise = torch.stack([torch.empty(vocab, dtype=torch.float32).exponential_(generator=g) for g in generators])
    sampled = (probs / noise.to(probs.device)).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Model log-probabilities of `tokens` (B,) under `logits` (B, V), with `top` alternatives."""
    lp = logits.float().log_softmax(-1)  # (B, V)
    chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
    alts = lp.topk(top, dim=-1) if top > 0 else None
    out = []
    for i, t in enumerate(tokens.tolist()):
        alt = list(zip(alts.indices[i].tolist(), alts.values[i].tolist())) if alts is not None else []
        out.append(TokenLogprob(t, chosen[i], alt))
    return out
