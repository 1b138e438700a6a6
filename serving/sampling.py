"""Sampling parameters and a batched sampler with per-request reproducible randomness.

Randomness comes from the exponential race (Gumbel-max): token = argmax(p / E) with E ~ Exp(1)
drawn from the request's own generator, so a seeded request samples the same tokens whatever
else shares its batch. Reported log-probabilities are those of the model's own distribution
(log-softmax of the raw logits, vLLM's default `raw_logprobs`).

A row's logits go through vLLM's steps in vLLM's order (`vllm/v1/sample/sampler.py`): `penalize`
masks EOS and stop tokens before `min_tokens` and applies the repetition, frequency and presence
penalties (`vllm/model_executor/layers/utils.py` `apply_penalties`); `sample` then applies the
temperature, `min_p`, top-k and top-p (greedy rows take the argmax of the penalized logits).
Penalties, min_tokens and min_p work on the rows that ask for them only (penalties on the entries
those rows have seen, not the whole vocabulary), and are skipped when no row in the batch has any.
Before all of them the scheduler masks the rows under `structured_outputs` to what their grammar
allows (`structured.mask_logits`), again only when some row has one.

Degenerate settings mean what they say rather than produce garbage: a temperature below
`GREEDY_EPS` is greedy (dividing by it would overflow float32, as vLLM also treats it), a top_p
too small for float32 keeps the most likely token alone, a top_k at or over the vocabulary keeps
all. A row whose logits hold NaN or +Inf, or leave no token possible, is reported (`NonFiniteLogits`
naming the rows) so that the engine fails that request alone; -Inf is a masked token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .structured import StructuredOutputsParams

GREEDY_EPS = 1e-5
"""temperatures below this are greedy (vLLM's `_SAMPLING_EPS`)"""


class NonFiniteLogits(ValueError):
    """Some rows' logits hold NaN or Inf; `rows` are their indices in the batch."""

    def __init__(self, rows: list[int]):
        super().__init__(f"the model produced non-finite logits for batch rows {rows[:8]}")
        self.rows = rows


def _real(name: str, value, ok, accepted: str) -> None:
    """Refuse what is not a finite int or float (bools neither) or fails `ok`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            if math.isfinite(value) and ok(value):
                return
        except OverflowError:  # an int past float's range
            pass
    raise ValueError(f"{name} must be {accepted}, got {value!r}")


@dataclass
class SamplingParams:
    """How one request samples and when it stops (vLLM's names and meanings)."""

    max_tokens: int = 16
    """most new tokens to generate"""
    min_tokens: int = 0
    """fewest new tokens before EOS, a stop token or a stop string may end the request"""
    temperature: float = 1.0
    """0 is greedy"""
    top_p: float = 1.0
    """keep the smallest set of tokens whose probability reaches top_p"""
    top_k: int = 0
    """keep the k most likely tokens; 0 keeps all"""
    min_p: float = 0.0
    """drop tokens less likely than min_p times the most likely one (after temperature); 0 is off"""
    repetition_penalty: float = 1.0
    """logits of tokens in the prompt or output: positive ones divided by it, negative ones
    multiplied; 1 is off"""
    presence_penalty: float = 0.0
    """subtracted once from the logit of every token the output holds"""
    frequency_penalty: float = 0.0
    """subtracted from a token's logit once per time the output holds it"""
    seed: int | None = None
    """per-request seed: the same seed gives the same tokens"""
    stop: list[str] = field(default_factory=list)
    """stop strings; the output text ends before the first one found"""
    stop_token_ids: list[int] = field(default_factory=list)
    """tokens that end the request: kept in `token_ids`, left out of the text (`stop_reason` = the id)"""
    ignore_eos: bool = False
    """keep going past the model's end-of-sequence token"""
    skip_special_tokens: bool = True
    """leave special tokens out of the output text"""
    logprobs: int | None = None
    """None: no logprobs; 0: the sampled token's; k: also the top-k alternatives"""
    structured_outputs: StructuredOutputsParams | None = None
    """hold the output to a JSON schema, regex, choice or grammar (`serving.structured`); the
    grammar's end ends the job (finish `stop`), even under ignore_eos"""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        _real("temperature", self.temperature, lambda v: v >= 0, "a finite number >= 0")
        _real("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _real("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)")
        _real("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a finite number > 0 (1 = off)")
        _real("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2] (0 = off)")
        _real("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2] (0 = off)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**63), got {self.seed!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs must be StructuredOutputsParams (or a dict of its fields), "
                                 f"got {type(self.structured_outputs).__name__}")
            if self.min_tokens:  # its EOS mask could leave a finished grammar no token at all
                raise ValueError(f"min_tokens ({self.min_tokens}) cannot be combined with structured_outputs: the "
                                 f"grammar decides where the output ends; send min_tokens 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalized(self) -> bool:
        """Some penalty is on: sampling needs the tokens seen so far."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and the top alternatives at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def penalize(logits: torch.Tensor, params: Sequence[SamplingParams], outputs: Sequence[Sequence[int]],
             prompts: Sequence[torch.Tensor | None], eos_token_ids: set[int]) -> torch.Tensor:
    """`logits` (B, V) after each row's min_tokens mask and penalties; `logits` itself when no row has any.

    Row i: `outputs[i]` its output token ids so far, `prompts[i]` its prompt's distinct token ids
    (a 1-D int64 tensor on the logits' device; read only where repetition_penalty != 1). Where t
    is in the prompt or the output, x[t] = x[t] / rep if x[t] > 0 else x[t] * rep; then
    x[t] -= frequency * count_out(t) + presence * (count_out(t) > 0). While a row has fewer than
    min_tokens outputs, its stop_token_ids and `eos_token_ids` are -inf (EOS even under ignore_eos,
    as vLLM's `_all_stop_token_ids`).
    """
    pen = [i for i, p in enumerate(params) if p.penalized]
    held = [i for i, p in enumerate(params) if len(outputs[i]) < p.min_tokens]
    if not pen and not held:
        return logits
    logits = logits.clone(memory_format=torch.contiguous_format)  # the raw logits give the reported logprobs
    vocab = logits.shape[1]
    flat = logits.view(-1)  # (B * V,): row i, token t at i * V + t
    if pen:
        _penalties(flat, vocab, pen, params, outputs, prompts)
    if held:
        keys = torch.tensor([i * vocab + t for i in held for t in eos_token_ids.union(params[i].stop_token_ids)
                             if t < vocab], device=logits.device, dtype=torch.long)  # an id past V is never sampled
        bad = ~torch.isfinite(flat[keys])  # NaN or +inf that the mask would hide from `sample`'s check
        if bool(bad.any()):
            raise NonFiniteLogits(sorted(set((keys[bad] // vocab).tolist())))
        flat[keys] = -math.inf
    return logits


def _penalties(flat: torch.Tensor, vocab: int, rows: list[int], params: Sequence[SamplingParams],
               outputs: Sequence[Sequence[int]], prompts: Sequence[torch.Tensor | None]) -> None:
    """vLLM's repetition, frequency and presence penalties, in place, on the (row, token) entries
    `rows` have seen: work grows with the tokens seen, not with the vocabulary."""
    dev = flat.device
    out_keys = torch.tensor([i * vocab + t for i in rows for t in outputs[i]], device=dev, dtype=torch.long)
    seen = [out_keys]
    rep_rows = [i for i in rows if params[i].repetition_penalty != 1]
    if rep_rows:  # one cat and one offset for all prompts (a tensor op per row costs more than its work)
        ids = [prompts[i] for i in rep_rows]
        offsets = torch.tensor([i * vocab for i in rep_rows], device=dev).repeat_interleave(
            torch.tensor([len(x) for x in ids], device=dev))
        seen.append(torch.cat(ids) + offsets)
    keys, inverse = torch.unique(torch.cat(seen), return_inverse=True)  # (K,) distinct (row, token) seen
    counts = torch.bincount(inverse[: len(out_keys)], minlength=len(keys)).to(flat.dtype)  # (K,) in the output
    per_row = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                           device=dev, dtype=flat.dtype)  # (B, 3)
    rep, freq, pres = per_row[keys // vocab].unbind(-1)  # (K,) each: the entry's row's values
    x = flat[keys]  # (K,)
    x = torch.where(x > 0, x / rep, x * rep)
    flat[keys] = x - freq * counts - pres * (counts > 0)


def _refuse(bad: torch.Tensor) -> None:
    if bool(bad.any()):
        raise NonFiniteLogits(bad.nonzero()[:, 0].tolist())


def argmax(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`x.argmax(-1)` of (B, V) float logits free of NaN, the first index of each row's maximum as
    torch's: on CPU through `amax`, which is vectorised where `argmax` is not (16 x 49152: ~0.1 vs
    0.85 ms). The row's first block holding its maximum, then the first position in that block."""
    b, v = x.shape
    nb = v // block
    if x.device.type != "cpu" or nb < 2 or not x.is_contiguous():
        return x.argmax(-1)
    blocks = x[:, : nb * block].view(b, nb, block).amax(-1)  # (B, nb)
    if nb * block < v:
        blocks = torch.cat([blocks, x[:, nb * block:].amax(-1, keepdim=True)], dim=-1)
    first = blocks.argmax(-1)  # (B,) the first block reaching the row's maximum
    start = first * block
    span = torch.arange(block, device=x.device)
    idx = (start[:, None] + span).clamp_(max=v - 1)  # the tail block is shorter: clamped positions repeat its last
    return start + x.gather(1, idx).argmax(-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row of `logits` (B, V) under each row's params; returns (B,) int64."""
    b, vocab = logits.shape
    # -inf is a masked token (`penalize`); NaN, +inf or a row with nothing left is garbage: a row's
    # max is NaN, +inf or -inf exactly then (one vectorised pass instead of three comparisons)
    _refuse(~torch.isfinite(logits.amax(-1)))
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.all()):
        return argmax(logits)
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
    x = logits / temp[:, None]  # (B, V)
    min_p = [i for i, p in enumerate(params) if p.min_p > 0 and not p.greedy]
    if min_p:  # vLLM: after the temperature, before top-k/top-p
        # p[t] < min_p * max(p)  <=>  x[t] < max(x) + log(min_p): no softmax needed
        rows = torch.tensor(min_p, device=x.device)
        sub = x if len(min_p) == b else x[rows]  # (M, V)
        floor = sub.amax(-1, keepdim=True) + torch.tensor([math.log(params[i].min_p) for i in min_p],
                                                          device=x.device, dtype=x.dtype)[:, None]
        sub = sub.masked_fill(sub < floor, -math.inf)
        x = sub if len(min_p) == b else x.index_copy(0, rows, sub)
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
    return torch.where(greedy, argmax(logits), sampled)


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
