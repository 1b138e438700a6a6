"""The `Backend` protocol over any OpenAI-compatible server, through the official `openai` client.

The same graphs run in-process (`EngineBackend`) or against `kilolora serve`, vLLM, or another
server offering `/v1/completions`. A sequence here is text held by the client; every request sends
its whole text as the prompt of a completion, under the adapter's model name, and a batch of
requests is sent concurrently (one thread each), so the server batches them together.

What degrades over plain HTTP, and how much:

- Prefix reuse: the server's prefix cache reuses *whole blocks* of a prompt it computed before
  (`usage.prompt_tokens_details.cached_tokens`); the partial block at the end of the shared
  prefix is recomputed. In-process, a fork shares every computed token.
- `fork` before sampling (`GenRequest(max_tokens=0)`): sent as a 1-token completion whose output
  is dropped, so the prompt's blocks are cached before the copies' requests arrive.
- Scoring a skill: the same one-token completion with `logprobs=20` as in-process; it needs the
  server to apply an activated adapter from its invocation on (kilolora does; a server without
  activated-LoRA support applies it to the whole prompt, which changes the score).
- Stop strings: the generated text must include the stop string that ended it (vLLM's
  `include_stop_str_in_output`, which kilolora accepts too; the choice's `stop_reason` is the
  fallback). The end-of-sequence token is not part of the text, so a graph that appends after
  the end continues without it (in-process, it stays in the context).
- Tokens: text is re-tokenized by the server on each request; for a character-level or
  byte-level model that is exact, for BPE models a boundary can tokenize differently.
- Chat prompts are rendered by the server's `/tokenize` endpoint (kilolora, vLLM); elsewhere
  pass `chat_template` (a Jinja template, rendered here).
- `score`: the text and the continuation are tokenized apart by the server (`/tokenize`, as
  `Engine.score` tokenizes a continuation on its own), and their tokens are sent as one prompt
  with `echo`, `max_tokens=0`, `logprobs=0`: the continuation's `token_logprobs` are the score.
  It needs a server that scores prompts (kilolora, vLLM).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .backend import GenRequest, GenResult, Tokens

OnText = Callable[[int, str], None]
"""on_text(request index, new text) while a batch generates"""


class ServerError(RuntimeError):
    """The server could not be reached, or answered a request with an error."""


def _call(fn, *args, **kw):
    """Run an `openai` client call; its failures become `ServerError`s with a one-line message."""
    import openai

    try:
        return fn(*args, **kw)
    except openai.APIStatusError as err:
        msg = err.body.get("message") if isinstance(err.body, dict) else None  # the client unwraps `error`
        raise ServerError(f"the server answered {err.status_code}: {msg or err.message}") from None
    except openai.APIConnectionError as err:
        raise ServerError(f"cannot reach the server at {err.request.url if err.request else '?'}: {err}") from None


class HttpBackend:
    """Sequences as client-side text; generation through `/v1/completions` (module docstring)."""

    name = "http"

    def __init__(self, base_url: str, model: str = "base", api_key: str = "EMPTY", chat_template: str | None = None,
                 bos_token: str = "", max_concurrency: int = 64, timeout: float = 600.0, client=None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL like http://127.0.0.1:8000/v1, got {base_url!r}")
        if client is None:
            try:
                import openai
            except ImportError as err:
                raise ImportError("the HTTP backend needs the openai client: pip install 'openai>=1.40'") from err
            client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.client = client
        self.model = model
        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.chat_template, self.bos_token = chat_template, bos_token
        self._seqs: dict[int, str] = {}
        self._ids = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="kilolora-http")

    # ----------------------------------------------------------------- chats
    def chat_prompt(self, messages: str | list[dict]) -> str:
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if self.chat_template is not None:
            import jinja2

            env = jinja2.Environment(undefined=jinja2.StrictUndefined)
            return env.from_string(self.chat_template).render(messages=msgs, add_generation_prompt=True,
                                                              bos_token=self.bos_token)
        r = _call(self.client.post, f"{self.root}/tokenize", cast_to=dict,
                  body={"model": self.model, "messages": msgs, "add_generation_prompt": True})
        if "prompt" in r:
            return r["prompt"]
        d = _call(self.client.post, f"{self.root}/detokenize", cast_to=dict,
                  body={"model": self.model, "tokens": r["tokens"]})
        return d["prompt"]

    # ------------------------------------------------------------- sequences
    def _text(self, seq: int) -> str:
        if seq not in self._seqs:
            raise KeyError(f"no open sequence {seq}")
        return self._seqs[seq]

    def open(self, prompt: str) -> int:
        seq = next(self._ids)
        self._seqs[seq] = prompt
        return seq

    def fork(self, seq: int, n: int) -> list[int]:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"fork needs n >= 1, got {n!r}")
        return [self.open(self._text(seq)) for _ in range(n)]

    def extend(self, seq: int, text: str) -> None:
        self._seqs[seq] = self._text(seq) + text

    def mark(self, seq: int) -> int:
        return len(self._text(seq))

    def rewind(self, seq: int, mark: int) -> None:
        text = self._text(seq)
        if not isinstance(mark, int) or not 0 <= mark <= len(text):
            raise ValueError(f"rewind mark must be in [0, {len(text)}], got {mark!r}")
        self._seqs[seq] = text[:mark]

    def text(self, seq: int, since: int = 0) -> str:
        return self._text(seq)[since:]

    def close(self, seq: int) -> None:
        self._seqs.pop(seq, None)

    def score(self, seq: int, continuation: str, adapter: str | None = None) -> list[float]:
        """log p(each token of `continuation` | the sequence's text, the tokens before it) under
        `adapter` (None: the base), from the server's echoed prompt logprobs (module docstring)."""
        ctx, cont = self._tokenize(self._text(seq)), self._tokenize(continuation)
        if not ctx:
            raise ValueError("score needs a non-empty context")
        if not cont:
            raise ValueError("score needs at least one continuation token")
        out = _call(self.client.completions.create, model=adapter or self.model, prompt=ctx + cont, echo=True,
                    max_tokens=0, logprobs=0)
        lp = out.choices[0].logprobs
        scores = lp.token_logprobs if lp is not None else None
        if scores is None or len(scores) != len(ctx) + len(cont):
            raise ServerError("the server did not score the prompt (it needs completions' echo with logprobs)")
        return scores[len(ctx):]

    def _tokenize(self, text: str) -> list[int]:
        r = _call(self.client.post, f"{self.root}/tokenize", cast_to=dict,
                  body={"model": self.model, "prompt": text, "add_special_tokens": False})
        return r["tokens"]

    # ------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenRequest], on_text: OnText | None = None) -> list[GenResult]:
        if len({r.seq for r in requests}) != len(requests):
            raise ValueError("one request per sequence per batch")
        for r in requests:
            self._text(r.seq)
        futures = [self._pool.submit(self._one, i, r, on_text) for i, r in enumerate(requests)]
        results = [f.result() for f in futures]
        for r, res in zip(requests, results):
            if res.finish_reason != "prefilled":
                self._seqs[r.seq] += res.text
        return results

    def _one(self, index: int, r: GenRequest, on_text: OnText | None) -> GenResult:
        prompt = self._seqs[r.seq]
        kw = dict(model=r.adapter or self.model, prompt=prompt, max_tokens=max(r.max_tokens, 1),
                  temperature=r.temperature, top_p=r.top_p, stop=list(r.stop) or None, seed=r.seed,
                  logprobs=r.logprobs, extra_body={"include_stop_str_in_output": True})
        if r.max_tokens == 0:  # prefill before a fork: compute (and cache) the prompt, drop the token
            kw.update(model=self.model, temperature=0.0, stop=None, logprobs=None)
        if on_text is None or r.max_tokens == 0:
            out = _call(self.client.completions.create, **kw)
            c, u = out.choices[0], out.usage
            text, finish = c.text, c.finish_reason
            stop_reason = getattr(c, "stop_reason", None)
            tops = c.logprobs.top_logprobs if c.logprobs is not None else None
        else:
            text, finish, stop_reason, tops, u = _call(self._stream, index, kw, on_text)
        cached = _cached(u)
        tokens = Tokens(u.prompt_tokens - cached, cached, u.completion_tokens if r.max_tokens else 0)
        if r.max_tokens == 0:
            return GenResult("", "prefilled", False, tokens)
        if finish == "stop" and isinstance(stop_reason, str) and not text.endswith(stop_reason):
            text += stop_reason  # a server that drops the stop string but names it
            if on_text is not None:
                on_text(index, stop_reason)
        hit = finish == "stop" and any(text.endswith(s) for s in r.stop)
        top = [dict(t) for t in tops] if tops is not None and r.logprobs is not None else None
        return GenResult(text, finish, finish == "stop" and not hit, tokens, top)

    def _stream(self, index: int, kw: dict, on_text: OnText):
        stream = _call(self.client.completions.create, stream=True, stream_options={"include_usage": True}, **kw)
        parts, tops, finish, stop_reason, u = [], [], None, None, None
        for chunk in stream:
            if chunk.usage is not None:
                u = chunk.usage
            for c in chunk.choices:
                if c.text:
                    parts.append(c.text)
                    on_text(index, c.text)
                if c.logprobs is not None and c.logprobs.top_logprobs:
                    tops.extend(c.logprobs.top_logprobs)
                if c.finish_reason is not None:
                    finish, stop_reason = c.finish_reason, getattr(c, "stop_reason", None)
        if u is None:
            raise RuntimeError("the server sent no usage in its stream (stream_options.include_usage)")
        return "".join(parts), finish, stop_reason, (tops if kw.get("logprobs") is not None else None), u

    def models(self) -> list[str]:
        """Ids of the models (base and adapters) the server serves."""
        return [m.id for m in _call(self.client.models.list).data]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _cached(usage) -> int:
    d = getattr(usage, "prompt_tokens_details", None)
    return (getattr(d, "cached_tokens", None) or 0) if d is not None else 0
