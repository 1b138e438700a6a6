"""The `Backend` protocol the orchestrator runs on, and the in-process engine backend.

A backend holds *sequences* (a context the model has read) and runs generation requests on them
in batches. Everything the orchestrator does reduces to these primitives:

- `open`, `fork` (copies share the prompt's KV cache), `extend` (append text, e.g. a tool result),
  `mark` / `rewind` (backtracking), `text`, `close`;
- `generate(requests)`: run many requests *together* (one engine batch); a request names its
  adapter, so one sequence is served by the base, a verifier, a tool selector... step by step.
  The generated text, through the stop string that ended it, is appended to the sequence.

Scoring a yes/no skill is a one-token generation with `logprobs` on a fork extended by the skill's
invocation, the same primitive on every backend (over OpenAI-compatible HTTP, `max_tokens=1,
logprobs=20` on `/v1/completions`). Each result carries token counts: context tokens computed
(`prefilled`), context tokens whose KV was already there (`reused`: the fork's prefix, or the
prefix cache) and tokens generated (`decoded`).

Both backends also offer `score(seq, continuation, adapter)`: the log-probability of each token of
a text after the sequence (`Engine.score`; over HTTP, a completion with `echo`, `max_tokens=0` on a
server that scores prompts, as kilolora and vLLM do). Graphs do not need it, so it is not part of
the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from serving.tokens import Tokens

__all__ = ["Backend", "EngineBackend", "GenRequest", "GenResult", "Tokens"]


@dataclass
class GenRequest:
    """Generate on a sequence; the output is appended to it."""

    seq: int
    adapter: str | None = None
    """adapter name, or None for the base model"""
    max_tokens: int = 64
    """0: only compute the context (before a fork, so the copies share its cache)"""
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    """None, or how many top alternatives to report per generated token (at most 20)"""


@dataclass
class GenResult:
    text: str
    """the generated text through the stop string that ended it (special tokens dropped)"""
    finish_reason: str
    """`stop` (a stop string or the end of sequence) or `length`"""
    eos: bool
    """ended on the model's end-of-sequence token"""
    tokens: Tokens
    top_logprobs: list[dict[str, float]] | None = None
    """per generated token: {token text: log-probability} of the top alternatives"""


@runtime_checkable
class Backend(Protocol):
    """What the executor needs from a model server (see the module docstring)."""

    name: str

    def chat_prompt(self, messages: str | list[dict]) -> str:
        """The model's prompt for a user message, or a list of chat messages ({role, content})."""

    def open(self, prompt: str) -> int: ...

    def fork(self, seq: int, n: int) -> list[int]: ...

    def extend(self, seq: int, text: str) -> None: ...

    def mark(self, seq: int) -> int: ...

    def rewind(self, seq: int, mark: int) -> None: ...

    def text(self, seq: int, since: int = 0) -> str: ...

    def close(self, seq: int) -> None: ...

    def generate(self, requests: Sequence[GenRequest], on_text: Callable[[int, str], None] | None = None
                 ) -> list[GenResult]:
        """Run the requests together; `on_text(i, text)` streams request i's output as it comes
        (the pieces add up to its `GenResult.text`)."""


class EngineBackend:
    """The in-process backend: sequences are engine sequences; a batch of requests is submitted at
    once and stepped together, so branches share engine steps (and forks share KV blocks). A
    world's engine: `orchestrator.world.world_backend`."""

    name = "engine"

    def __init__(self, engine):
        if engine.tokenizer is None:
            raise ValueError("the orchestrator needs an engine with a tokenizer")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._reserved = None

    def chat_prompt(self, messages: str | list[dict]) -> str:
        """The chat template's prompt; messages holding special tokens (or, outside assistant text,
        tool markup) are refused with ValueError, as the server refuses them."""
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if self._reserved is None:
            from serving.openai.tool_formats import Reserved

            self._reserved = Reserved(self.tokenizer)
        self._reserved.check(msgs)
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def open(self, prompt: str) -> int:
        return self.engine.open(prompt)

    def fork(self, seq: int, n: int) -> list[int]:
        return self.engine.fork(seq, n)

    def extend(self, seq: int, text: str) -> None:
        self.engine.extend(seq, text)

    def mark(self, seq: int) -> int:
        return len(self.engine.tokens(seq))

    def rewind(self, seq: int, mark: int) -> None:
        self.engine.rewind(seq, mark)

    def text(self, seq: int, since: int = 0) -> str:
        return self.tokenizer.decode(self.engine.tokens(seq)[since:], skip_special_tokens=True)

    def close(self, seq: int) -> None:
        self.engine.close(seq)

    def score(self, seq: int, continuation: str, adapter: str | None = None) -> list[float]:
        """log p(each token of `continuation` | the sequence, the tokens before it) under `adapter`
        (None: the base); the sequence is left as it is."""
        return self.engine.score(seq, continuation, adapter)

    def generate(self, requests: Sequence[GenRequest], on_text: Callable[[int, str], None] | None = None
                 ) -> list[GenResult]:
        from serving.sampling import SamplingParams

        eng = self.engine
        if len({r.seq for r in requests}) != len(requests):
            raise ValueError("one request per sequence per batch")
        starts, waiting = [], []
        for r in requests:
            starts.append(len(eng.tokens(r.seq)))
            if r.max_tokens == 0:  # under the sequence's current adapter
                if eng.submit_prefill(r.seq):
                    waiting.append(r.seq)
                continue
            if eng.adapter_of(r.seq) != r.adapter:
                eng.set_adapter(r.seq, r.adapter)
            eng.submit(r.seq, SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                             stop=list(r.stop), seed=r.seed, logprobs=r.logprobs))
            waiting.append(r.seq)
        streamed: dict[int, str] = {}
        if on_text is not None:
            index = {r.seq: i for i, r in enumerate(requests) if r.max_tokens > 0}
            while any(eng.running(q) for q in waiting):
                for d in eng.step():
                    if d.text and d.seq in index:
                        streamed[d.seq] = streamed.get(d.seq, "") + d.text
                        on_text(index[d.seq], d.text)
        by_seq = dict(zip(waiting, eng.wait(waiting)))
        out = []
        for i, (r, start) in enumerate(zip(requests, starts)):
            c = by_seq.get(r.seq)
            if c is None or c.finish_reason == "prefilled":
                n = c.counters if c is not None else None
                out.append(GenResult("", "prefilled", False, Tokens(n.prefilled if n else 0, 0, 0)))
                continue
            if c.finish_reason == "error":
                raise RuntimeError(f"generation failed on sequence {r.seq}: {c.error}")
            text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            if on_text is not None and len(text) > len(streamed.get(r.seq, "")):
                on_text(i, text[len(streamed.get(r.seq, "")):])  # the stop string, held back
            top = None
            if c.logprobs is not None:
                top = [dict(zip(self.tokenizer.convert_ids_to_tokens([t for t, _ in x.top]), (lp for _, lp in x.top)))
                       for x in c.logprobs]
            eos = bool(c.token_ids) and c.token_ids[-1] in eng.eos_token_ids
            n = c.counters
            out.append(GenResult(text, c.finish_reason, eos,
                                 Tokens(n.prefilled, max(start - n.prefilled, 0), n.decoded), top))
        return out
