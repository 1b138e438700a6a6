"""Structured outputs: a job's output held to a JSON schema, any JSON object, a regex, one of a list
of strings, or an EBNF grammar, by masking each step's logits to the tokens the grammar allows next
(grammar-constrained decoding; vLLM's `StructuredOutputsParams`, its names and meanings).

A spec is compiled once per tokenizer into an automaton over token ids, kept in a bounded LRU
(`Grammars`); each job gets its own matcher, which the scheduler asks for a token bitmask before
sampling and advances with every token the job commits. When the grammar is complete only EOS is
allowed, and the job ends with finish reason `stop`. The engine's `fork` and `rewind` act on idle
sequences only (never while a job runs), so a matcher never has to follow either: a new job starts a
new matcher at the job's first output token. Sequences without a spec cost nothing: a step in which
no job has one skips all of this.

The library is XGrammar (Dong et al., "XGrammar: Flexible and Efficient Structured Generation Engine
for Large Language Models", MLSys 2025; vLLM's default structured-output backend), chosen over
llguidance and outlines-core by measurement on this project's machine (2 shared CPU cores, one
thread): a 7-property schema (a nested object, an enum, an array, bounded strings, numbers), 64
matchers walking it on random logits; `fill` is the time to write their 64 token bitmasks per step
(applying a bitmask is the same kernel whichever library fills it); `valid` counts the finished
completions that parse and validate (`jsonschema`).

    | library (version)     | tokenizer            | compile | fill, 64 rows / step | valid         |
    |-----------------------|----------------------|---------|----------------------|---------------|
    | xgrammar 0.2.9        | world (char, V=109)  |   2 ms  |   0.08 ms            | 68/68 (*)     |
    | xgrammar 0.2.9        | SmolLM2 (BPE, 49152) |  11 ms  |   0.6 ms             | 156/169 (**)  |
    | llguidance 1.9.1      | world (char, V=109)  |   7 ms  |   6.2 ms             | 89/89 (***)   |
    | llguidance 1.9.1      | SmolLM2 (BPE, 49152) |   9 ms  |  14.0 ms             | 257/257       |
    | outlines-core 0.2.14  | world (char, V=109)  |  23 ms  |   0.24 ms            | 23/69         |
    | outlines-core 0.2.14  | SmolLM2 (BPE, 49152) | 1300 ms |   1.6 ms             | 67/193        |

A decode step of the world model at batch 64 takes 18-28 ms here, so llguidance's masks would add
20-50% to a fully constrained batch and xgrammar's under 1%. outlines-core compiles the schema to a
regex, which drops `minimum`/`maximum` (most of its outputs failed validation), and needs a
hand-made vocabulary for any tokenizer (no hub here). llguidance is correct out of the box, but its
HF loader refuses the world's tokenizer (a `Fuse` decoder: (***) after wrapping it by hand). XGrammar
reads every tokenizer the tests use (character, byte-level BPE, SentencePiece with byte fallback);
its defects are corrected here and checked by tests/serving/test_structured.py: (*) its HF loader
takes the world's special tokens (`<|user|>`, ...) for text, so they are handed to it as special
(never allowed; EOS stays the stop token); (**) strings with `minLength` / `maxLength` use a
character class that lets control characters through (invalid JSON), and every string admits UTF-16
surrogates (invalid UTF-8): those classes are replaced in the grammar it derives from a schema
(150/150 valid after). Length-bounded strings allow no escape sequences, as XGrammar writes them.
Its price: xgrammar pulls `triton` on Linux x86_64 (already a dev dependency here, and CUDA torch's).

Limits (a client's schema is untrusted): a spec's text is at most `MAX_SPEC_BYTES`, a compilation
at most `Grammars.compile_timeout_s` (it runs on one worker thread, so a slow one delays only other
compilations), and `Grammars.max_cached` compiled specs are kept. JSON is written without free
whitespace (`, ` and `: ` separators, as `json.dumps`), which keeps a small model from looping on
spaces (vLLM's `disable_any_whitespace`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch

MAX_SPEC_BYTES = 64 * 1024
"""largest schema (as JSON text), regex, grammar or list of choices (UTF-8 bytes)"""
MAX_CHOICES = 1024

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_WHAT = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
         "json_object": "JSON object grammar"}


class StructuredOutputError(ValueError):
    """A spec that does not compile (or not in time); the message says why."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError as err:
        raise ImportError("structured outputs need xgrammar: pip install 'xgrammar>=0.2.9'") from err
    return xgrammar


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a job's output must match: exactly one of `json`, `regex`, `choice`, `grammar`,
    `json_object` (vLLM's `StructuredOutputsParams`)."""

    json: str | dict | bool | type | None = None
    """a JSON schema (a dict, its JSON text, or a pydantic model class); kept as JSON text"""
    regex: str | None = None
    """the whole output matches this regex"""
    choice: tuple[str, ...] | list[str] | None = None
    """the output is exactly one of these strings"""
    grammar: str | None = None
    """an EBNF grammar (GBNF, as llama.cpp and vLLM's xgrammar backend take it) with a `root` rule"""
    json_object: bool = False
    """the output is a JSON object (OpenAI's `response_format: {"type": "json_object"}`)"""

    def __post_init__(self):
        j = self.json
        if isinstance(j, type) and hasattr(j, "model_json_schema"):  # a pydantic model
            j = j.model_json_schema()
        if isinstance(j, (dict, bool)):
            j = json.dumps(j, ensure_ascii=False)
        if j is not None:
            if not isinstance(j, str):
                raise ValueError(f"json must be a JSON schema (a dict, its JSON text or a pydantic model), got "
                                 f"{type(self.json).__name__}")
            try:
                doc = json.loads(j)
            except json.JSONDecodeError as err:
                raise ValueError(f"json is not valid JSON text: {err}") from None
            if not isinstance(doc, (dict, bool)):
                raise ValueError(f"json must be a JSON schema: an object (or true/false), got {type(doc).__name__}")
        object.__setattr__(self, "json", j)
        if self.choice is not None:
            if isinstance(self.choice, str) or any(not isinstance(c, str) for c in self.choice):
                raise ValueError(f"choice must be a list of strings, got {self.choice!r:.80}")
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise ValueError(f"choice must hold 1 to {MAX_CHOICES} strings, got {len(self.choice)}")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a non-empty string, got {v!r:.80}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be True or False, got {self.json_object!r}")
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_KINDS)}; got {given or 'none'}")
        k = self.kind
        texts = self.choice if k == "choice" else [] if k == "json_object" else [getattr(self, k)]
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > MAX_SPEC_BYTES:
            raise ValueError(f"{self.kind} is {size} bytes; at most {MAX_SPEC_BYTES} are accepted")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, Any]:
        """What the compiled grammar depends on (the cache key)."""
        k = self.kind
        return (k, True) if k == "json_object" else (k, getattr(self, k))


# xgrammar 0.2.9 writes the characters of a length-bounded JSON string as `_BOUNDED`, which admits
# control characters (invalid in JSON), and those of other strings as `_UNBOUNDED`; both admit
# UTF-16 surrogates (U+D800-DFFF: invalid UTF-8, decoded as U+FFFD). `_CHAR` is what JSON allows
# unescaped. It stays one character class: a rule in its place (e.g. to allow escapes in bounded
# strings too) defeats xgrammar's precomputed masks, 0.01 -> 40 ms a mask at a 49152-token vocabulary.
_BOUNDED = r'[^\"\\\r\n]'
_UNBOUNDED = r'[^\0-\x1f\"\\\r\n]'
_CHAR = r'[^\0-\x1f\"\\\uD800-\uDFFF]'
_LOCATION = re.compile(r"^(\[[\d:]+\] )?\S+\.(cc|h):\d+: (Check failed: )?")


def _json_grammar(xgr, schema: str, strict: bool = True) -> str:
    """The EBNF xgrammar derives from a JSON schema (no free whitespace), its strings held to
    characters JSON allows (length-bounded strings, as xgrammar writes them, without escapes)."""
    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict))
    return ebnf.replace(_UNBOUNDED, _CHAR).replace(_BOUNDED, _CHAR)


def _message(err: Exception) -> str:
    """xgrammar's error without its C++ location prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _LOCATION.sub("", text)


def _tokenizer_info(xgr, tokenizer, vocab_size: int, stop_ids: list[int]):
    """xgrammar's view of `tokenizer`: its decoding (raw, byte-level or byte-fallback, as xgrammar's
    HF loader detects it) with every special token but the stop tokens made unreachable (an empty
    string is what xgrammar never matches)."""
    hf = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    encoded = [""] * vocab_size
    for piece, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in special:
            encoded[i] = piece
    return xgr.TokenizerInfo(encoded, hf.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_ids,
                             add_prefix_space=hf.add_prefix_space)


class Matcher:
    """One job's position in its grammar."""

    __slots__ = ("_m",)

    def __init__(self, compiled):
        self._m = _xgrammar().GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask` (int32, (B, ceil(V / 32)))."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self._m.accept_token(token):
            raise StructuredOutputError(f"token {token} is not allowed by the job's grammar here")

    @property
    def done(self) -> bool:
        """The grammar is complete and its end (EOS) was accepted."""
        return self._m.is_terminated()


class Grammars:
    """Compiled specs for one tokenizer, least recently used evicted past `max_cached`. Safe to use
    from any thread (the server compiles a request's spec while preparing it, off the engine thread)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], *, max_cached: int = 128,
                 compile_timeout_s: float = 10.0):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_ids = sorted(t for t in eos_token_ids if t < vocab_size)
        self.max_cached = max_cached
        """compiled specs kept"""
        self.compile_timeout_s = compile_timeout_s
        """a spec not compiled by then is refused (the compilation itself finishes in the background)"""
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._compiler = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._cache)

    def matcher(self, spec: StructuredOutputsParams) -> Matcher:
        return Matcher(self.compile(spec))

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of `spec` (from the cache when it holds it); StructuredOutputError if
        it does not compile in time."""
        if not isinstance(spec, StructuredOutputsParams):
            raise TypeError(f"expected StructuredOutputsParams, got {type(spec).__name__}")
        key = spec.key
        with self._lock:
            fut = self._cache.get(key)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kilolora-grammar")
                fut = self._cache[key] = self._pool.submit(self._compile, spec)
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        try:
            return fut.result(timeout=self.compile_timeout_s)
        except FutureTimeout:
            self._forget(key, fut)
            raise StructuredOutputError(f"the {_WHAT[spec.kind]} did not compile within "
                                        f"{self.compile_timeout_s:g} s") from None
        except Exception:  # a failure is not cached: the next request tries again (and fails as fast)
            self._forget(key, fut)
            raise

    def _forget(self, key, fut) -> None:
        with self._lock:
            if self._cache.get(key) is fut:
                del self._cache[key]

    def _compile(self, spec: StructuredOutputsParams):
        xgr = _xgrammar()
        if self._compiler is None:  # only this worker thread builds it
            info = _tokenizer_info(xgr, self.tokenizer, self.vocab_size, self.stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        c, kind = self._compiler, spec.kind
        try:
            if kind == "json":
                return c.compile_grammar(_json_grammar(xgr, spec.json))
            if kind == "json_object":
                return c.compile_grammar(_json_grammar(xgr, '{"type": "object"}', strict=False))
            if kind == "regex":
                return c.compile_regex(spec.regex)
            if kind == "choice":
                literals = (json.dumps(x, ensure_ascii=False) for x in spec.choice)  # EBNF reads JSON's escapes
                return c.compile_grammar("root ::= " + " | ".join(literals))
            return c.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as err:  # xgrammar reports a bad spec as RuntimeError
            raise StructuredOutputError(f"the {_WHAT[kind]} does not compile: {_message(err)}") from None


def mask_logits(logits: torch.Tensor, rows: list[int], matchers: list[Matcher], *,
                inplace: bool = False) -> torch.Tensor:
    """`logits` (B, V) in which row rows[j] keeps only what matchers[j] allows next (-inf elsewhere),
    the other rows unchanged: a copy, or `logits` itself with `inplace` (a copy of a large batch's
    logits costs more than the masks). Raises StructuredOutputError naming the rows whose grammar
    allows no token of the vocabulary (e.g. a character the tokenizer cannot write)."""
    b, vocab = logits.shape
    bitmask = torch.full((b, (vocab + 31) // 32), -1, dtype=torch.int32)  # (B, ceil(V/32)); bit t: token t allowed
    for r, m in zip(rows, matchers):
        m.fill(bitmask, r)
    live = bitmask.numpy()[rows].any(-1)  # (R,): numpy, a few µs where torch takes tens
    if not live.all():
        bad = [r for r, ok in zip(rows, live.tolist()) if not ok]
        raise StructuredOutputError(f"batch rows {bad[:8]}: the grammar allows no token of this vocabulary next")
    x = logits if inplace else logits.clone()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        _xgrammar().apply_token_bitmask_inplace(x, bitmask, vocab_size=vocab, indices=rows, backend="cpu")
        return x
    # elsewhere the bits are unpacked on the logits' device (no kernel to build for it)
    idx = torch.tensor(rows)
    words = bitmask[idx].to(x.device, non_blocking=True)  # (R, W)
    shifts = torch.arange(32, device=x.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()  # (R, V)
    idx = idx.to(x.device)
    x[idx] = x[idx].masked_fill(~allowed, float("-inf"))
    return x
