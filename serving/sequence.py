"""Per-sequence state of the engine: tokens, the adapter each token is computed with, blocks, jobs,
and the incremental detokenizer that turns a job's output tokens into text (vLLM's prefix/read
offsets, `vllm/transformers_utils/detokenizer_utils.py`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .adapters import BASE, AdapterInfo
from .sampling import SamplingParams, TokenLogprob
from .structured import Matcher
from .tokens import Tokens


@dataclass
class Completion:
    """The result of generating on one sequence."""

    seq: int
    """the sequence generated on (closed already when it came from `Engine.generate`)"""
    token_ids: list[int]
    text: str | None
    """decoded output (special tokens in it only with `skip_special_tokens=False`), cut before a
    stop string; a stop token or EOS that ended it is in `token_ids` only, as in vLLM (None without
    a tokenizer)"""
    finish_reason: str
    """`stop` (end-of-sequence, stop token or stop string), `length`, or `error`"""
    stop_reason: str | int | None = None
    """the stop string or the `stop_token_ids` entry that ended it; None for EOS or length (vLLM)"""
    logprobs: list[TokenLogprob] | None = None
    counters: Tokens = field(default_factory=Tokens)
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
    first_token_at: float | None = None
    """`time.monotonic()` when the job's first token came out (set by `AsyncEngine` on the
    finishing delta, streamed or not: the server's time to first token for whole responses)"""


@dataclass
class GenJob:
    params: SamplingParams
    generator: torch.Generator
    start: int
    """length of the sequence when the job began: output = tokens[start:]"""
    counters: Tokens = field(default_factory=Tokens)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pending: int = 0
    """trailing sampled tokens not yet computed (counted as decoded, not prefilled)"""
    detokenizer: IncrementalDetokenizer | None = None
    """the output's text so far (None without a tokenizer)"""
    emitted_tokens: int = 0
    emitted_text: int = 0
    """characters of the text already streamed"""
    stops_after: int = 0
    """stop strings count only where they end past this character (the text of the first min_tokens tokens)"""
    prompt_ids: torch.Tensor | None = None
    """the distinct tokens of tokens[:start] on the model's device, built when a repetition penalty needs them"""
    grammar: Matcher | None = None
    """with `params.structured_outputs`: where the output is in its grammar (advanced on each committed token)"""
    result: Completion | None = None

    def __post_init__(self):
        if self.detokenizer is not None:
            self.detokenizer.skip_special_tokens = self.params.skip_special_tokens

    def prompt_tensor(self, tokens: list[int], device) -> torch.Tensor:
        """`prompt_ids`, built once: a job's prompt never changes while it runs (`Engine._idle`)."""
        if self.prompt_ids is None:
            self.prompt_ids = torch.tensor(sorted(set(tokens[: self.start])), device=device, dtype=torch.long)
        return self.prompt_ids


@dataclass
class ScoreJob:
    logits_from: int
    """first position whose next-token log-probability is wanted"""
    counters: Tokens = field(default_factory=Tokens)
    scores: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    top: int | None = None
    """None: the scores alone; k >= 0: also each scored token's rank and the k most likely tokens"""
    ranks: list[int] = field(default_factory=list)
    """per scored token (with `top`): 1 + the number of tokens more likely than it"""
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list)
    """per scored token (with `top`): the `top` most likely (token, log-probability), best first"""


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
    keys: list[bytes] = field(default_factory=list)
    """prefix-cache key of every full computed block (`blocks.block_key`)"""
    num_computed: int = 0
    job: GenJob | ScoreJob | None = None
    owned: bool = False
    """created by generate()/score(): closed by the engine when its job ends"""
    arrival: int = 0
    group: object = None
    """fair-scheduling group (e.g. one HTTP request's sequences); None: a group of its own"""

    @property
    def running(self) -> bool:
        """A job was submitted and has not finished (`Engine.wait` collects finished ones)."""
        j = self.job
        if isinstance(j, ScoreJob):
            return not j.done
        return j is not None and j.result is None

    def uid_at(self, pos: int) -> int:
        a = self.adapter
        if a is None:
            return BASE
        if a.activated and (self.alora_start is None or pos < self.alora_start):
            return BASE
        return a.uid

    def logits_from(self) -> int:
        """First position whose logits the job still needs (it must be computed, not cached): a
        score computed over several steps has the positions it already scored behind it."""
        if isinstance(self.job, ScoreJob):
            return self.job.logits_from + len(self.job.scores)
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


class IncrementalDetokenizer:
    """The text of a job's output tokens, `tokenizer.decode(output, skip_special_tokens=...)`,
    kept up to date by decoding only the tokens since the last complete character.

    vLLM's offsets (and `tokenizers.decoders.DecodeStream`): `decode(out[prefix:])` minus
    `decode(out[prefix:read])` is the text the tokens from `read` on add. Both decodes start at the
    same token, so what a tokenizer does at the start of a string (SentencePiece drops the first
    token's space) cancels out. Text is confirmed once it ends in a complete character and then
    never changes; while the tail ends in an incomplete one (U+FFFD) it is `pending` and redone
    each step. The window starts two confirmed pieces back (vLLM: one), so that the last piece is
    all in `decode(out[prefix:read])` even when the first character is dropped: a decode that
    re-renders confirmed text shows there, and is met with a full decode, the exact O(n) way, for
    that step (a byte-fallback run turns to U+FFFD as a whole while its last character is
    incomplete or once it holds an invalid byte; a full decode is then also what gets confirmed).
    `clean_up_tokenization_spaces` can rewrite text further back than the window, so a tokenizer
    that has it on is decoded in full every step."""

    def __init__(self, tokenizer, start: int, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.start = start
        """the output is tokens[start:] of the sequence"""
        self.skip_special_tokens = skip_special_tokens
        """leave special tokens out of the text (set before the first `update`)"""
        self.prefix = self.read = 0
        """offsets into the output: decoding starts at `prefix`, text is confirmed up to `read`"""
        self._last = 0
        """where the last confirmed piece's tokens start (`prefix`: the piece's before it)"""
        self.whole = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        """decode the whole output every step"""
        self.pending = ""
        self._pieces: list[str] = []
        self._confirmed = 0
        self._base = 0
        """confirmed characters the text holds before `pending`: all of them, or none in a step
        where `pending` is the whole text"""
        self._searched = 0
        """confirmed length when `find_stop` last ran: stop strings ending before it were looked for"""

    def __len__(self) -> int:
        return self._base + len(self.pending)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def update(self, tokens: list[int]) -> None:
        """Take in the output tokens appended since the last call (`tokens`: the whole sequence)."""
        if self.whole:
            self.pending, self._base = self._decode(tokens[self.start:]), 0
            return
        window = tokens[self.start + self.prefix:]
        before = self._decode(window[: self.read - self.prefix])
        text = self._decode(window)
        extends = text.startswith(before)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the rest
            if extends:
                self.pending, self._base = text[len(before):], self._confirmed
            else:  # the wait re-renders confirmed text: this step's text is a full decode
                self.pending, self._base = self._decode(tokens[self.start:]), 0
            return
        if extends:
            new = text[len(before):]
            if not new:  # nothing yet (e.g. a skipped special token): keep the offsets, as vLLM does
                self.pending, self._base = "", self._confirmed
                return
            self._pieces.append(new)
            self._confirmed += len(new)
        else:  # the new tokens rewrote confirmed text: confirm a full decode instead
            full = self._decode(tokens[self.start:])
            self._pieces, self._confirmed, self._searched = [full], len(full), 0
            self.read = self._last = 0
        self.pending, self._base = "", self._confirmed
        self.prefix, self._last, self.read = self._last, self.read, len(tokens) - self.start

    def text(self, a: int, b: int) -> str:
        """text[a:b], reading only the confirmed pieces from `a` on."""
        c = self._base
        if a >= c:
            return self.pending[a - c: b - c]
        parts, got = [], 0
        for piece in reversed(self._pieces):
            parts.append(piece)
            got += len(piece)
            if got >= c - a:
                break
        head = "".join(reversed(parts))
        return (head[len(head) - (c - a):] + self.pending)[: b - a]

    def run_before(self, pos: int, char: str) -> int:
        """How many `char` end at `pos`: the largest k with text[pos - k: pos] == char * k."""
        k = 0
        for ch in self._chars_before(pos):
            if ch != char:
                break
            k += 1
        return k

    def _chars_before(self, pos: int) -> Iterator[str]:
        c = self._base
        if pos > c:
            yield from reversed(self.pending[: pos - c])
            pos = c
        if not c:  # none of the confirmed text is in this step's text
            return
        skip = c - pos  # confirmed characters after pos
        for piece in reversed(self._pieces):
            if skip >= len(piece):
                skip -= len(piece)
                continue
            yield from reversed(piece[: len(piece) - skip])
            skip = 0

    def find_stop(self, stops: Sequence[str], after: int = 0) -> tuple[int, str] | None:
        """(start, stop string) of the first stop string in the text that ends past character
        `after`, the earliest start and then the smallest string winning (as `min` over
        `(text.find(x), x)`), or None. Only the text an occurrence not seen by the previous calls
        can lie in is searched: from a little before the confirmed text already searched (all of it
        in a step whose text is a full decode) or before `after`, whichever is later (vLLM's
        min_tokens: stop strings wholly in the first min_tokens tokens' text do not count)."""
        start = max(0, max(min(self._searched, self._base), after) - max(len(x) for x in stops) + 1)
        window = self.text(start, len(self))
        hits = [(i, x) for x in stops if (i := window.find(x, max(0, after - len(x) + 1 - start))) >= 0]
        if self._base == self._confirmed:
            self._searched = self._confirmed
        if not hits:
            return None
        cut, which = min(hits)
        return start + cut, which
