"""A deterministic fake backend: one character is one token, and the "model" is a function of
(context, adapter, seed), so graph programs can be checked exactly, next to the real engine."""

from __future__ import annotations

import hashlib
import math

from orchestrator.backend import GenRequest, GenResult, Tokens

EOS = "<|end|>"


def _h(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def default_model(context: str, adapter: str | None, seed: int | None, temperature: float) -> str:
    """Greedy: `ab.` repeated, then the end; sampled: letters chosen by the seed. The text an
    adapter writes starts with its name, so tests can see which adapter ran."""
    if temperature == 0:
        body = "ab. ab. " * 3
    else:
        body = "".join("abcd. "[_h(context, seed, i) % 6] for i in range(24))
    return (f"<{adapter}>" if adapter else "") + body.strip() + EOS


class FakeBackend:
    name = "fake"

    def __init__(self, model=default_model, yes: str = "y", no: str = "n"):
        self.model, self.yes, self.no = model, yes, no
        self.seqs: dict[int, list[str]] = {}
        self.computed: dict[int, int] = {}
        self.next_id = 0
        self.batches: list[int] = []
        """size of every generate() call (tests check that branches are batched)"""

    def chat_prompt(self, messages) -> str:
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"

    def open(self, prompt: str) -> int:
        self.next_id += 1
        self.seqs[self.next_id] = list(prompt)
        self.computed[self.next_id] = 0
        return self.next_id

    def fork(self, seq: int, n: int) -> list[int]:
        out = []
        for _ in range(n):
            k = self.open("")
            self.seqs[k] = list(self.seqs[seq])
            self.computed[k] = self.computed[seq]
            out.append(k)
        return out

    def extend(self, seq: int, text: str) -> None:
        self.seqs[seq].extend(text)

    def mark(self, seq: int) -> int:
        return len(self.seqs[seq])

    def rewind(self, seq: int, mark: int) -> None:
        del self.seqs[seq][mark:]
        self.computed[seq] = min(self.computed[seq], mark)

    def text(self, seq: int, since: int = 0) -> str:
        return "".join(self.seqs[seq][since:]).replace(EOS, "")

    def close(self, seq: int) -> None:
        self.seqs.pop(seq, None)
        self.computed.pop(seq, None)

    def generate(self, requests: list[GenRequest], on_text=None) -> list[GenResult]:
        self.batches.append(len(requests))
        out = []
        for i, r in enumerate(requests):
            ctx = "".join(self.seqs[r.seq])
            tokens = Tokens(prefilled=len(ctx) - self.computed[r.seq], reused=self.computed[r.seq])
            self.computed[r.seq] = len(ctx)
            if r.max_tokens == 0:
                out.append(GenResult("", "prefilled", False, tokens))
                continue
            if r.logprobs is not None:  # a yes/no judgement: P(yes) from the context's hash
                p = 0.05 + 0.9 * (_h(ctx, r.adapter) % 1000) / 1000
                top = {self.yes: math.log(p), self.no: math.log(1 - p)}
                text = self.yes if p >= 0.5 else self.no
                self.seqs[r.seq].append(text)
                tokens.decoded = 1
                out.append(GenResult(text, "length", False, tokens, [top]))
                continue
            full = self.model(ctx, r.adapter, r.seed, r.temperature)
            text, eos, reason = "", False, "length"
            k = 0
            while len(text) < r.max_tokens and k < len(full):
                if full.startswith(EOS, k):
                    eos, reason = True, "stop"
                    break
                text += full[k]
                k += 1
                if any(text.endswith(s) for s in r.stop):
                    reason = "stop"
                    break
            self.seqs[r.seq].extend(text)
            if eos:
                self.seqs[r.seq].append(EOS)
            tokens.decoded = len(text) + eos
            if on_text is not None:
                for ch in text:  # streamed one "token" at a time
                    on_text(i, ch)
            out.append(GenResult(text, reason, eos, tokens))
        return out
