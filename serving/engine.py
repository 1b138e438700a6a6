"""The engine: one model, a paged KV cache, the adapter registry, and a continuous-batching loop
(the `Scheduler`, which owns the open sequences and their job queue).

Every `step()` packs the uncomputed tokens of every active sequence (prefill chunks and single
decode tokens alike) into one forward, each token carrying the uid of its adapter. Sequences are
the unit the orchestrator works with: `open`, `extend`, `fork` (shares blocks), `rewind` (drops a
tail), `set_adapter` (activated adapters keep the cached prefix; standard ones re-prefill, from the
prefix cache when possible), `score`, and generation jobs on any of them. A job may hold its output to
a grammar (`SamplingParams.structured_outputs`, `serving.structured`); like every job it runs on an
idle sequence, and fork/rewind wait until it has finished.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compression.peft_io import LoraAdapter

from . import cpu_kernels
from .adapters import BASE, AdapterInfo, AdapterRegistry
from .blocks import BlockManager
from .model import KVCache, Transformer, load_model
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Completion, Delta, GenJob, IncrementalDetokenizer, ScoreJob, Seq, Tokens, find_last
from .structured import Grammars


@dataclass
class ScoreResult:
    """A finished score (`Engine.submit_score` / `score_ranked`)."""

    logprobs: list[float]
    """log p(continuation[j] | context, continuation[:j]) for each j"""
    counters: Tokens
    ranks: list[int] | None = None
    """with `top`: each token's rank under the model (1 = the most likely)"""
    top: list[list[tuple[int, float]]] | None = None
    """with `top` = k: the k most likely (token, log-probability) at each position, best first"""


class Engine:
    """Serve a base model plus many adapters; see the module docstring."""

    def __init__(self, model: Transformer, tokenizer=None, *, block_size: int = 16, kv_cache_tokens: int = 65536,
                 max_batch_tokens: int = 2048, max_model_len: int | None = None, seed: int = 0,
                 max_lora_rank: int | None = None, packed_weights: bool | None = None):
        if block_size < 1 or kv_cache_tokens < block_size or max_batch_tokens < 1:
            raise ValueError(f"need block_size >= 1, kv_cache_tokens >= block_size, max_batch_tokens >= 1; got "
                             f"{block_size}, {kv_cache_tokens}, {max_batch_tokens}")
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        # the packed path (serving.model.PackedWeights): None = where supported, False = the reference path
        if packed_weights is False or model.packed is None:
            model.use_packed(packed_weights)
        if torch.device(model.device).type == "cpu":  # activations reuse warm heap pages (see there)
            cpu_kernels.retain_heap()
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len if max_model_len is not None else model.config.max_position_embeddings
        num_blocks = math.ceil(kv_cache_tokens / block_size)
        self.cache = KVCache(model.config, num_blocks, block_size, model.dtype, model.device)
        self.blocks = BlockManager(num_blocks)
        self.registry = AdapterRegistry(model.config, model.dtype, model.device, model=model)
        self.registry.max_lora_rank = max_lora_rank
        """dense adapters of a larger rank are refused (None: no limit)"""
        self._rng = torch.Generator().manual_seed(seed)
        eos = model.config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.scheduler = Scheduler(model, self.cache, self.blocks, self.registry, max_batch_tokens=max_batch_tokens,
                                   max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids)
        """the open sequences, their job queue and the step"""
        self.grammars = Grammars(tokenizer, model.config.vocab_size, self.eos_token_ids) \
            if tokenizer is not None else None
        """structured outputs' compiled specs (the one part of the engine safe to use from any thread)"""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, bank: str | os.PathLike | None = None,
                        adapters: dict[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
                        dtype: torch.dtype | None = None, device: str = "cpu", **kwargs) -> Engine:
        """Load a HF checkpoint directory, optionally a bank and PEFT adapters (`{name: dir}` or dirs).
        `path` may also be a `.gguf` file: it is converted once through transformers' GGUF loader
        and the checkpoint cached by the file's sha256 (see `serving.gguf`)."""
        path = Path(path)
        if path.suffix.lower() == ".gguf":
            from .gguf import gguf_checkpoint

            path = gguf_checkpoint(path)
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked but torch sees no CUDA device")
        model = load_model(path, dtype=dtype, device=device)
        tokenizer = None
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        engine = cls(model, tokenizer, **kwargs)
        if bank is not None:
            engine.load_bank(bank)
        if adapters:
            items = adapters.items() if isinstance(adapters, dict) else [(Path(p).name, p) for p in adapters]
            for name, p in items:
                engine.load_adapter(name, p)
        return engine

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str | os.PathLike, *, replace: bool = False) -> AdapterInfo:
        """Serve the PEFT directory `path` as `name`; `replace=True` swaps out an adapter already
        loaded as `name` (vLLM's `load_inplace`; refused while open sequences use it)."""
        if replace:
            self._check_unused(name)
        return self.registry.load_adapter(name, path, replace=replace)

    def add_adapter(self, name: str, adapter: LoraAdapter, *, replace: bool = False) -> AdapterInfo:
        """Serve an adapter already read (`compression.peft_io.load_adapter`) as `name` (`replace`:
        see `load_adapter`)."""
        if replace:
            self._check_unused(name)
        return self.registry.add_adapter(name, adapter, replace=replace)

    def load_bank(self, bank, prefix: str = "") -> list[AdapterInfo]:
        return self.registry.load_bank(bank, prefix=prefix)

    def unload_adapter(self, name: str) -> None:
        self._check_unused(name)
        self.registry.unload(name)

    def _check_unused(self, name: str) -> None:
        if name not in self.registry:
            return
        info = self.registry.get(name)
        users = [s.id for s in self.scheduler.seqs.values() if s.adapter is not None and s.adapter.uid == info.uid]
        if users:
            raise ValueError(f"adapter {name!r} is in use by {len(users)} open sequence(s) {users[:5]}; close them first")

    @property
    def adapters(self) -> list[str]:
        return self.registry.names

    def _adapter(self, name: str | None) -> AdapterInfo | None:
        return None if name is None or name == "base" else self.registry.get(name)

    # ----------------------------------------------------------------- sequences
    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids, not text")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {bad[:5]}")
        return ids

    def _seq(self, seq: int) -> Seq:
        return self.scheduler.get(seq)

    def open(self, prompt: str | Sequence[int] = (), adapter: str | None = None, group: object = None) -> int:
        """A new idle sequence holding `prompt`; nothing is computed until a job needs it. Sequences
        of one `group` (a server passes one per request; forks inherit it) share each batch fairly
        with other groups (see `scheduler._fair`)."""
        s = self.scheduler.open(group)
        try:
            s.adapter = self._adapter(adapter)
            self.extend(s.id, prompt)
        except Exception:  # a refused prompt or adapter leaves no sequence behind
            self.scheduler.close(s.id)
            raise
        return s.id

    def tokens(self, seq: int) -> list[int]:
        return list(self._seq(seq).tokens)

    def adapter_of(self, seq: int) -> str | None:
        a = self._seq(seq).adapter
        return a.name if a is not None else None

    def extend(self, seq: int, tokens: str | Sequence[int]) -> None:
        """Append tokens (or text) to an idle sequence."""
        s = self._seq(seq)
        self._idle(s, "extend")
        ids = self._encode(tokens)
        if len(s.tokens) + len(ids) > self.max_model_len:
            raise ValueError(f"sequence would be {len(s.tokens) + len(ids)} tokens, over max_model_len {self.max_model_len}")
        s.tokens.extend(ids)
        s.adapters.extend([BASE] * len(ids))
        self._retarget(s, search=True)

    def set_adapter(self, seq: int, adapter: str | None) -> None:
        """Switch the sequence's adapter. Activated adapters keep the cached prefix; standard ones
        apply to the whole context (recomputed, from the prefix cache where it holds it)."""
        s = self._seq(seq)
        self._idle(s, "set_adapter")
        s.adapter = self._adapter(adapter)
        s.alora_start = None
        self._retarget(s, search=True)

    def _retarget(self, s: Seq, search: bool) -> None:
        """Recompute which adapter each token wants; drop computed state from the first change."""
        a = s.adapter
        if a is not None and a.activated and search:
            s.alora_start = find_last(s.tokens, a.alora_invocation_tokens)
        n = len(s.tokens)
        # `Seq.uid_at` of every position, as its two runs: the base's up to `base`, then the adapter's
        if a is None:
            base = n
        elif a.activated:
            base = n if s.alora_start is None else min(s.alora_start, n)
        else:
            base = 0
        want = [BASE] * base + [a.uid] * (n - base) if base < n else [BASE] * n
        first = n
        if s.adapters != want:
            first = next((pos for pos, (have, uid) in enumerate(zip(s.adapters, want)) if have != uid),
                         min(len(s.adapters), n))
            s.adapters[:] = want
        self.scheduler.invalidate(s, first)

    def fork(self, seq: int, n: int = 1) -> list[int]:
        """n copies of an idle sequence sharing its computed blocks (copy-on-write)."""
        s = self._seq(seq)
        self._idle(s, "fork")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"fork needs n >= 1, got {n!r}")
        return [self.scheduler.fork(s).id for _ in range(n)]

    def rewind(self, seq: int, pos: int) -> None:
        """Drop every token from `pos` on (backtracking); blocks no one else uses are freed."""
        s = self._seq(seq)
        self._idle(s, "rewind")
        if not isinstance(pos, int) or not 0 <= pos <= len(s.tokens):
            raise ValueError(f"rewind position must be in [0, {len(s.tokens)}], got {pos!r}")
        self.scheduler.invalidate(s, pos)
        del s.tokens[pos:], s.adapters[pos:]
        a = s.adapter
        if a is not None and a.activated and s.alora_start is not None and s.alora_start + len(a.alora_invocation_tokens) > pos:
            s.alora_start = None

    def close(self, seq: int) -> None:
        """Free the sequence (its full blocks stay in the prefix cache until reused)."""
        self.scheduler.close(seq)

    def _idle(self, s: Seq, what: str) -> None:
        if s.job is not None:
            raise RuntimeError(f"cannot {what} sequence {s.id} while a job runs on it")

    # ---------------------------------------------------------------------- jobs
    def submit(self, seq: int, params: SamplingParams | None = None, *, seed_offset: int = 0) -> None:
        """Start generating on an idle sequence; `step()` advances it."""
        s = self._seq(seq)
        self._idle(s, "submit")
        params = params if params is not None else SamplingParams()
        if not s.tokens:
            raise ValueError("cannot generate from an empty sequence: give at least one prompt token")
        if len(s.tokens) >= self.max_model_len:
            raise ValueError(f"prompt has {len(s.tokens)} tokens; max_model_len is {self.max_model_len}")
        worst = min(len(s.tokens) + params.max_tokens, self.max_model_len)
        if math.ceil(worst / self.block_size) > self.blocks.num_blocks:
            raise ValueError(f"request needs up to {worst} tokens of KV cache; the cache holds "
                             f"{self.blocks.num_blocks * self.block_size} (raise kv_cache_tokens)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        grammar = None
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need a tokenizer; this engine has none")
            grammar = self.grammars.matcher(params.structured_outputs)  # StructuredOutputError (a ValueError)
        g = torch.Generator()
        g.manual_seed(params.seed + seed_offset if params.seed is not None
                      else int(torch.randint(0, 2**62, (1,), generator=self._rng)))
        detok = IncrementalDetokenizer(self.tokenizer, len(s.tokens)) if self.tokenizer is not None else None
        s.job = GenJob(params=params, generator=g, start=len(s.tokens), detokenizer=detok, grammar=grammar)
        self.scheduler.enqueue(s)

    def submit_score(self, seq: int, continuation: Sequence[int] | str, adapter: str | None = None,
                     top: int | None = None) -> int:
        """Start scoring `continuation` after the idle sequence `seq` under `adapter` (None: base) on
        a fork of it, which `step()` advances; returns the fork, whose `score_result` collects the
        result (and closes it). `top` (k >= 0) also ranks each token and lists the k most likely."""
        s = self._seq(seq)
        self._idle(s, "score")
        if not s.tokens:
            raise ValueError("score needs a non-empty context")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 0):
            raise ValueError(f"top must be None or an integer >= 0, got {top!r}")
        cont = self._encode(continuation)
        if not cont:
            raise ValueError("score needs at least one continuation token")
        (f,) = self.fork(seq)
        fs = self._seq(f)
        fs.owned = True
        try:
            if adapter is not None or (s.adapter is not None):
                self.set_adapter(f, adapter)
            self.extend(f, cont)
        except Exception:
            self.close(f)
            raise
        fs.job = ScoreJob(logits_from=len(s.tokens) - 1, top=top)
        self.scheduler.enqueue(fs)
        return f

    def score_result(self, fork: int) -> ScoreResult:
        """The finished score of a `submit_score` fork, which is closed; a failed one raises RuntimeError."""
        fs = self._seq(fork)
        job = fs.job
        if not isinstance(job, ScoreJob) or not job.done:
            raise ValueError(f"sequence {fork} has no finished score")
        fs.job = None
        self.close(fork)
        if job.error:
            raise RuntimeError(job.error)
        return ScoreResult(job.scores, job.counters, job.ranks if job.top is not None else None,
                           job.alternatives if job.top is not None else None)

    def score_many(self, items: Sequence[tuple[int, Sequence[int] | str, str | None]]) -> list[tuple[list[float], Tokens]]:
        """Log-probabilities of each continuation after its sequence, under the given adapter,
        computed together; the sequences themselves are left unchanged."""
        return [(r.logprobs, r.counters) for r in self.score_ranked(items)]

    def score_ranked(self, items: Sequence[tuple[int, Sequence[int] | str, str | None]],
                     top: int | None = None) -> list[ScoreResult]:
        """`score_many` with each result whole: with `top` (k >= 0), every continuation token's rank
        and the k most likely tokens at its position (what `prompt_logprobs` reports)."""
        forks = []
        try:
            for seq, cont, adapter in items:
                forks.append(self.submit_score(seq, cont, adapter, top))
            while any(not self._seq(f).job.done for f in forks):
                self.step()
            return [self.score_result(f) for f in forks]
        finally:
            for f in forks:  # those a failure left behind
                self.close(f)

    def score(self, seq: int, continuation: Sequence[int] | str, adapter: str | None = None) -> list[float]:
        """log p(continuation[j] | sequence, continuation[:j]) for each j; `adapter=None` scores with base."""
        return self.score_many([(seq, continuation, adapter)])[0][0]

    def run(self, seqs: Sequence[int], params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Generate on idle sequences together until each finishes; the sequences keep their output."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(seqs)
        for i, (seq, p) in enumerate(zip(seqs, plist)):
            self.submit(seq, p, seed_offset=i)
        return self.wait(seqs)

    def submit_prefill(self, seq: int) -> bool:
        """Compute an idle sequence's context now (all but its last token, which the next job
        computes for its logits), so that forks taken afterwards share its KV blocks. Returns
        False when there is nothing to compute; `wait` returns a `prefilled` Completion."""
        s = self._seq(seq)
        self._idle(s, "prefill")
        if s.num_computed >= len(s.tokens) - 1:
            return False
        s.job = ScoreJob(logits_from=len(s.tokens) - 1)
        self.scheduler.enqueue(s)
        return True

    def wait(self, seqs: Sequence[int]) -> list[Completion]:
        """Step until the jobs submitted on `seqs` (generation or prefill) finish; the sequences
        keep their output."""
        for q in seqs:
            if self._seq(q).job is None:
                raise ValueError(f"sequence {q} has no job to wait for")
        while any(self._seq(q).running for q in seqs):
            self.step()
        out = []
        for q in seqs:
            s = self._seq(q)
            job, s.job = s.job, None
            if isinstance(job, ScoreJob):
                out.append(Completion(q, [], "", "error" if job.error else "prefilled", counters=job.counters,
                                      error=job.error))
            else:
                out.append(job.result)
        return out

    def generate(self, prompts: Sequence[str | Sequence[int]] | str, adapter: str | None | Sequence[str | None] = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Generate for each prompt (with its own adapter if a list is given); sequences are closed after."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        seqs = []
        try:
            for p, a in zip(prompts, adapters):
                seqs.append(self.open(p, adapter=a))
                self._seq(seqs[-1]).owned = True
            return self.run(seqs, params)
        finally:
            for q in seqs:
                self.close(q)

    def stream(self, prompt: str | Sequence[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield the request's new tokens/text step by step; the last delta carries the Completion."""
        seq = self.open(prompt, adapter=adapter)
        self._seq(seq).owned = True
        try:
            self.submit(seq, params)
            while True:
                for d in self.step():
                    if d.seq == seq:
                        yield d
                        if d.finished is not None:
                            return
        finally:
            self.close(seq)

    # ------------------------------------------------------------------ stepping
    def running(self, seq: int) -> bool:
        """Whether a job submitted on `seq` is still being computed (`wait` collects it)."""
        return self._seq(seq).running

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def steps(self) -> int:
        """Forwards run so far."""
        return self.scheduler.steps

    def stats(self) -> dict:
        return {"blocks_total": self.blocks.num_blocks, "blocks_used": self.blocks.num_used,
                "blocks_free": self.blocks.num_free, "prefix_hits": self.blocks.hits,
                "open_sequences": len(self.scheduler.seqs), "adapters": len(self.registry), "steps": self.steps}

    def step(self) -> list[Delta]:
        """One forward over every running job's next tokens; returns streamed deltas."""
        return self.scheduler.step()
