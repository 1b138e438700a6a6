"""The scheduler: the open sequences, the queue of their jobs, and the step that advances them.

Each step picks tokens under a budget, secures blocks, runs the forward, samples and streams.
Jobs are served oldest first. Each sequence first takes what the prefix cache holds (full blocks
keyed by tokens and adapter uids), then gets a chunk of its remaining tokens (chunked prefill;
decode is a chunk of one). A block about to be written that others share is copied first
(copy-on-write). When blocks run out, the youngest running sequence is preempted (its blocks
released, recomputed later, mostly from the prefix cache); a job that cannot fit even alone ends
with a clear error. Output text is decoded incrementally (`sequence.IncrementalDetokenizer`).
Sampling masks the rows of jobs under structured outputs to their grammar (`structured.mask_logits`)
and runs `sampling.penalize` (min_tokens, penalties), each only when some job in the batch asks for
it, then `sampling.sample`; a job's grammar advances when its token is committed (a plan that
fails is retried in parts, so nothing before the commit may change it); stops follow vLLM
(`_finish_check`), and a grammar that reached its end stops its job.
"""

from __future__ import annotations

import math

import torch

from .adapters import AdapterRegistry
from .blocks import BlockManager, OutOfBlocks, block_key
from .model import AttnGroup, ForwardBatch, KVCache, Transformer
from .sampling import penalize, sample, token_logprobs
from .sequence import Completion, Delta, GenJob, ScoreJob, Seq
from .structured import mask_logits

Plan = list[tuple[Seq, int, int]]
"""(sequence, start, end): compute positions [start, end) of the sequence in this step"""

KEEP_MIN_DROPPED = 16
"""rows a step's logits do not read from which its last layer runs on the read rows only (below,
narrowing costs more Python than it saves)"""


class Scheduler:
    """Owns the open sequences (`seqs`, by id), the queue of those with a job (oldest first) and
    the blocks they hold; `step()` advances every queued job by one forward."""

    def __init__(self, model: Transformer, cache: KVCache, blocks: BlockManager, registry: AdapterRegistry, *,
                 max_batch_tokens: int, max_model_len: int, eos_token_ids: set[int]):
        self.model, self.cache, self.blocks, self.registry = model, cache, blocks, registry
        self.block_size = cache.block_size
        self.max_batch_tokens, self.max_model_len, self.eos_token_ids = max_batch_tokens, max_model_len, eos_token_ids
        self.seqs: dict[int, Seq] = {}
        self.queue: list[Seq] = []
        """sequences whose job is running, in order of submission"""
        self.steps = 0
        """forwards run"""
        self._next_seq = 0
        self._arrivals = 0

    # ----------------------------------------------------------------- sequences
    def open(self, group: object = None) -> Seq:
        """A new empty sequence (ids are never reused)."""
        s = Seq(id=self._next_seq, tokens=[], adapters=[], group=group)
        self._next_seq += 1
        self.seqs[s.id] = s
        return s

    def get(self, seq: int) -> Seq:
        s = self.seqs.get(seq)
        if s is None:
            raise KeyError(f"no open sequence {seq}")
        return s

    def fork(self, s: Seq) -> Seq:
        """A copy of `s` sharing its computed blocks (copy-on-write)."""
        c = Seq(id=self._next_seq, tokens=list(s.tokens), adapters=list(s.adapters), adapter=s.adapter,
                alora_start=s.alora_start, blocks=list(s.blocks), keys=list(s.keys), num_computed=s.num_computed,
                group=s.group)
        self._next_seq += 1
        for b in c.blocks:
            self.blocks.incref(b)
        self.seqs[c.id] = c
        return c

    def close(self, seq: int) -> None:
        """Forget the sequence and give back its blocks (full ones stay in the prefix cache)."""
        s = self.seqs.pop(seq, None)
        if s is None:
            return
        self.queue = [q for q in self.queue if q is not s]  # identity: Seq compares by value
        for b in s.blocks:
            self.blocks.decref(b)
        s.blocks.clear()

    def enqueue(self, s: Seq) -> None:
        """Queue the job just set on `s`."""
        assert s.running
        s.arrival = self._arrivals
        self._arrivals += 1
        self.queue.append(s)

    def invalidate(self, s: Seq, pos: int) -> None:
        """Drop what is computed from `pos` on: blocks past it go back, and the keys of blocks it cuts."""
        if pos >= s.num_computed:
            return
        s.num_computed = pos
        keep = math.ceil(pos / self.block_size)
        for b in s.blocks[keep:]:
            self.blocks.decref(b)
        del s.blocks[keep:]
        del s.keys[pos // self.block_size:]

    def has_work(self) -> bool:
        return any(s.running for s in self.queue)

    # ---------------------------------------------------------------------- step
    def step(self) -> list[Delta]:
        """One forward over every queued job's next tokens; returns the streamed deltas."""
        try:
            return self._step([s for s in self.queue if s.running])
        finally:
            self.queue = [s for s in self.queue if s.running]  # finished jobs leave; wait() collects them

    def _step(self, active: list[Seq]) -> list[Delta]:
        if not active:
            return []
        deltas: list[Delta] = []
        plan = self._schedule(_fair(active), deltas)
        if not plan:
            return deltas
        try:
            deltas += self._execute(plan)
        except Exception as err:  # noqa: BLE001 - isolate it: one bad request must not fail the batch
            if len(plan) == 1:
                d = _fail(plan[0][0], f"{type(err).__name__}: {err}")
                deltas += [d] if d is not None else []
            else:  # nothing was committed: run each sequence alone, failing only those that raise
                for item in plan:
                    try:
                        deltas += self._execute([item])
                    except Exception as one:  # noqa: BLE001
                        d = _fail(item[0], f"{type(one).__name__}: {one}")
                        deltas += [d] if d is not None else []
        return deltas

    # ------------------------------------------------------------------ planning
    def _match_prefix(self, s: Seq, limit: int) -> None:
        """Take full blocks from the prefix cache while positions stay below `limit`."""
        bs = self.block_size
        j = s.num_computed // bs
        if s.num_computed % bs:
            return  # a partial block is ours to finish
        while (j + 1) * bs <= limit:
            key = self._key(s, j)
            b = self.blocks.lookup(key)
            if b is None:
                return
            if j < len(s.blocks):
                self.blocks.decref(s.blocks[j])
                s.blocks[j] = b
            else:
                s.blocks.append(b)
            s.keys.append(key)
            s.num_computed = (j + 1) * bs
            s.job.counters.reused += bs
            j += 1

    def _release(self, s: Seq) -> None:
        """Preempt: give back every block; the job restarts from the prefix cache."""
        for b in s.blocks:
            self.blocks.decref(b)
        s.blocks.clear()
        s.keys.clear()
        s.num_computed = 0

    def _secure_blocks(self, s: Seq, end: int) -> None:
        """Make blocks cover positions [num_computed, end) and be private where they will be written."""
        bs, cache = self.block_size, self.cache
        if s.num_computed % bs and self.blocks.is_shared(s.blocks[-1]):
            new = self.blocks.allocate()
            old = s.blocks[-1]
            # A block is a run of slots: copy it as slices. Index tensors on dim 1 (`k[:, dst] =
            # k[:, src]`) made index_put_ go through the whole cache, ~20 ms per copy at 128k slots
            # on CPU, paid by every fork that writes after a shared partial block (best-of-n
            # samples, each verifier call).
            cache.k[:, new * bs:(new + 1) * bs] = cache.k[:, old * bs:(old + 1) * bs]
            cache.v[:, new * bs:(new + 1) * bs] = cache.v[:, old * bs:(old + 1) * bs]
            self.blocks.decref(old)
            s.blocks[-1] = new
        while len(s.blocks) < math.ceil(end / bs):
            s.blocks.append(self.blocks.allocate())

    def _schedule(self, active: list[Seq], deltas: list[Delta]) -> Plan:
        budget = self.max_batch_tokens
        plan: Plan = []
        queue = list(active)
        while queue and budget > 0:
            s = queue[0]
            if s.num_computed > s.logits_from():  # e.g. after a rewind: recompute to get logits
                self.invalidate(s, s.logits_from())
            self._match_prefix(s, s.logits_from())
            start = s.num_computed
            end = min(s.need_end(), start + budget)
            try:
                self._secure_blocks(s, end)
            except OutOfBlocks:
                # Preempt the youngest waiting sequence that holds blocks; never one already planned.
                victim = next((v for v in reversed(queue[1:]) if v.blocks), None)
                if victim is not None:
                    self._release(victim)
                    continue
                if not plan:
                    d = _fail(s, f"KV cache full: {self.blocks.num_used} of {self.blocks.num_blocks} blocks are held "
                                 f"by {len(self.seqs)} open sequences; close idle sequences or raise kv_cache_tokens")
                    if d is not None:
                        deltas.append(d)
                break
            queue.pop(0)
            plan.append((s, start, end))
            budget -= end - start
        return plan

    def _build(self, plan: Plan) -> tuple[ForwardBatch, list[int]]:
        bs, dev = self.block_size, self.model.device
        tokens, positions, slots, uids = [], [], [], []
        decode, prefill = [], []
        row = 0
        for s, start, end in plan:
            tokens += s.tokens[start:end]
            uids += s.adapters[start:end]
            for p in range(start, end):
                positions.append(p)
                slots.append(s.blocks[p // bs] * bs + p % bs)
            (decode if end - start == 1 else prefill).append((s, row, start, end))
            row += end - start
        windows = set(self.model.config.sliding_windows)
        groups = []
        if decode:
            groups.append(self._single_queries([(s, end) for s, _, _, end in decode], [r for _, r, _, _ in decode],
                                               covers_all=not prefill and len(decode) == row))
        # Prefill chunks of the same length attend together (padded keys, masked): many short chunks
        # (forks scoring a few tokens each over a shared prefix) would otherwise cost one attention
        # call per sequence and layer.
        by_len: dict[int, list] = {}
        for item in prefill:
            by_len.setdefault(item[3] - item[2], []).append(item)
        for q, items in by_len.items():
            starts = torch.tensor([start for _, _, start, _ in items], device=dev)  # (B,)
            ends = starts + q
            width = max(len(s.blocks) for s, *_ in items)
            table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s, *_ in items], device=dev)
            key_slots = (table[:, :, None] * bs + torch.arange(bs, device=dev)).view(len(items), -1)
            key_slots = key_slots[:, : int(ends.max())].contiguous()  # (B, L)
            kpos = torch.arange(key_slots.shape[1], device=dev)[None, None]  # (1, 1, L)
            qpos = (starts[:, None] + torch.arange(q, device=dev)[None])[:, :, None]  # (B, Q, 1)
            masks = {w: _mask(kpos, qpos, ends[:, None, None], w)[:, None] for w in windows}  # (B, 1, Q, L)
            q_rows = torch.tensor([r for _, r, _, _ in items], device=dev)[:, None] + torch.arange(q, device=dev)[None]
            groups.append(AttnGroup(q_rows, key_slots, masks, covers_all=len(plan) == 1, lengths=qpos[..., 0] + 1))
        batch = ForwardBatch(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                             torch.tensor(slots, device=dev), groups)
        return batch, uids

    def _single_queries(self, queries: list[tuple[Seq, int]], rows: list[int], covers_all: bool) -> AttnGroup:
        """One attention group of single queries: (sequence, keys it attends) each, at `rows`."""
        bs, dev = self.block_size, self.model.device
        lens = torch.tensor([n for _, n in queries], device=dev)  # (B,)
        width = max(len(s.blocks) for s, _ in queries)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s, _ in queries], device=dev)
        key_slots = (table[:, :, None] * bs + torch.arange(bs, device=dev)).view(len(queries), -1)
        key_slots = key_slots[:, : int(lens.max())].contiguous()  # (B, L)
        kpos = torch.arange(key_slots.shape[1], device=dev)[None]  # (1, L)
        qpos = (lens - 1)[:, None]  # (B, 1)
        masks = {w: _mask(kpos, qpos, lens[:, None], w)[:, None, None, :] for w in set(self.model.config.sliding_windows)}
        return AttnGroup(torch.tensor(rows, device=dev)[:, None], key_slots, masks, covers_all=covers_all, lengths=lens)

    def _keep(self, batch: ForwardBatch, rows: list[int], owners: list[tuple[Seq, str, tuple[int, int] | None]]) -> None:
        """Narrow the forward's last layer to the rows whose logits are read (`owners`, as `_execute`
        lists them), when that drops at least `KEEP_MIN_DROPPED` rows: a prefill's other tokens only
        feed the keys and values."""
        if int(batch.tokens.shape[0]) - len(rows) < KEEP_MIN_DROPPED:
            return
        batch.keep = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        if rows:  # each read row's sequence and the keys it attends: a generated one all, a scored one up to itself
            queries = [q for s, kind, span in owners
                       for q in ([(s, len(s.tokens))] if kind == "gen" else [(s, p + 1) for p in range(*span)])]
            batch.keep_groups = [self._single_queries(queries, list(range(len(rows))), covers_all=True)]

    # ----------------------------------------------------------------- execution
    def _execute(self, plan: Plan) -> list[Delta]:
        """Forward the plan, then commit it. Everything that can raise on one request's account (the
        forward, the logits, sampling) runs before any sequence changes, so a failed plan can be
        retried in parts; what runs after is per sequence."""
        batch, uids = self._build(plan)
        rows, owners = [], []
        row = 0
        for s, start, end in plan:
            if isinstance(s.job, GenJob):
                if end == len(s.tokens):
                    rows.append(row + end - start - 1)
                    owners.append((s, "gen", None))
            else:
                lo, hi = max(start, s.logits_from()), end  # after a preemption: not scored twice
                if hi > lo:
                    rows.extend(range(row + lo - start, row + hi - start))
                    owners.append((s, "score", (lo, hi)))
            row += end - start
        self._keep(batch, rows, owners)
        hidden = self.model.forward(batch, self.cache, self.registry.batch(uids))
        if batch.keep is None and rows:
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        logits = self.model.logits(hidden) if rows else None
        gen, scores = [], []
        at = 0
        for s, kind, span in owners:
            if kind == "gen":
                gen.append((s, at))
                at += 1
            else:
                lo, hi = span
                n = hi - lo
                targets = torch.tensor(s.tokens[lo + 1: hi + 1], device=logits.device)
                all_lp = logits[at: at + n].log_softmax(-1)  # (n, V)
                lp = all_lp.gather(-1, targets[:, None])[:, 0]
                top = s.job.top
                scores.append((s, lp.tolist(), _ranked(all_lp, lp, top) if top is not None else None))
                at += n
        sampled = _draw(gen, logits, self.eos_token_ids) if gen else []
        # Commit: from here on nothing raises for the batch.
        self.steps += 1
        for s, start, end in plan:
            job = s.job
            if isinstance(job, GenJob):
                job.counters.prefilled += end - start - min(job.pending, end - start)
                job.pending = 0
            else:
                job.counters.prefilled += end - start
            self._commit(s, end)
        for s, lps, ranked in scores:
            s.job.scores.extend(lps)
            if ranked is not None:
                s.job.ranks.extend(ranked[0])
                s.job.alternatives.extend(ranked[1])
        deltas = []
        for s, tok, lp in sampled:
            try:
                deltas.append(self._append(s, tok, lp))
            except Exception as err:  # noqa: BLE001 - e.g. a stop check that fails on this request's text
                d = _fail(s, f"{type(err).__name__}: {err}")
                deltas += [d] if d is not None else []
        for s, _, _ in plan:
            if isinstance(s.job, ScoreJob) and s.num_computed >= s.need_end():
                s.job.done = True
        return deltas

    def _commit(self, s: Seq, end: int) -> None:
        """Advance the computed mark and key every block that became full."""
        s.num_computed = end
        for j in range(len(s.keys), end // self.block_size):
            key = self._key(s, j)
            self.blocks.register(s.blocks[j], key)
            s.keys.append(key)

    def _key(self, s: Seq, j: int) -> bytes:
        """The prefix-cache key of block j of `s`, chained to the key of block j - 1."""
        bs = self.block_size
        return block_key(s.keys[j - 1] if j else None, s.tokens[j * bs:(j + 1) * bs], s.adapters[j * bs:(j + 1) * bs])

    def _append(self, s: Seq, tok: int, lp) -> Delta:
        job = s.job
        s.tokens.append(tok)
        s.adapters.append(s.uid_at(len(s.tokens) - 1))
        job.pending = 1
        job.counters.decoded += 1
        if lp is not None:
            job.logprobs.append(lp)
        if job.grammar is not None:
            job.grammar.accept(tok)
        return self._finish_check(s, tok)

    def _finish_check(self, s: Seq, tok: int) -> Delta:
        job, p = s.job, s.job.params
        n_out = len(s.tokens) - job.start
        reason, stop_reason = None, None
        # As vLLM: nothing but the length ends a job in its first min_tokens tokens (the sampler
        # masks EOS and stop tokens there); EOS ends it with no stop_reason, a stop token with its id.
        if n_out > p.min_tokens:
            if tok in self.eos_token_ids and not p.ignore_eos:
                reason = "stop"
            elif tok in p.stop_token_ids:
                reason, stop_reason = "stop", tok
        if reason is None and job.grammar is not None and job.grammar.done:  # its EOS, under ignore_eos
            reason = "stop"
        detok = job.detokenizer
        end = 0  # length of the output text, up to a stop string
        if detok is not None:
            if reason is None:  # the text of the token that ended the job is not output (vLLM)
                detok.update(s.tokens)
            end = len(detok)
            if p.stop and reason is None:
                if n_out <= p.min_tokens:  # text so far cannot hold a stop string that counts
                    job.stops_after = end - detok.run_before(end, "\ufffd")
                else:
                    hit = detok.find_stop(p.stop, job.stops_after)
                    if hit is not None:
                        end, which = hit
                        reason, stop_reason = "stop", which
        if reason is None and (n_out >= p.max_tokens or len(s.tokens) >= self.max_model_len):
            reason = "length"
        # Hold back text that may be the start of a stop string or an incomplete character.
        hold = 0
        if reason is None and detok is not None:
            hold = max((len(x) - 1 for x in p.stop), default=0)
            if hold < end:
                hold += detok.run_before(end - hold, "\ufffd")
        new_tokens = s.tokens[job.start + job.emitted_tokens:]
        delta_text = ""
        if detok is not None:
            visible = end - hold if reason is None else end
            delta_text = detok.text(job.emitted_text, max(visible, job.emitted_text))
            job.emitted_text = max(visible, job.emitted_text)
        job.emitted_tokens = n_out
        new_lp = job.logprobs[-1:] if p.logprobs is not None else None
        if reason is not None:
            text = detok.text(0, end) if detok is not None else None
            job.result = Completion(seq=s.id, token_ids=s.tokens[job.start:], text=text, finish_reason=reason,
                                    stop_reason=stop_reason,
                                    logprobs=list(job.logprobs) if p.logprobs is not None else None,
                                    counters=job.counters, adapter=s.adapter.name if s.adapter else None)
            if s.owned:  # generate()/stream() drop the sequence anyway: free its blocks for the others now
                self._release(s)
        return Delta(s.id, new_tokens, delta_text, new_lp, job.result)


def _mask(kpos, qpos, length, window):
    m = (kpos <= qpos) & (kpos < length)
    if window is not None:
        m &= kpos > qpos - window
    return m


def _fair(active: list[Seq]) -> list[Seq]:
    """Interleave request groups (oldest first within each): the k-th sequence of every group comes
    before the (k+1)-th of any, so one request with thousands of sequences cannot starve the others
    of batch room (nor, being last in the order, of KV blocks: preemption takes from the tail).
    Sequences outside any group are their own group, which keeps plain arrival order."""
    if all(s.group is None for s in active):
        return active
    rank: dict[object, int] = {}
    order = []
    for s in active:
        g = s.group if s.group is not None else ("seq", s.id)
        order.append((rank.get(g, 0), s.arrival, s))
        rank[g] = rank.get(g, 0) + 1
    return [s for _, _, s in sorted(order, key=lambda t: t[:2])]


def _fail(s: Seq, msg: str) -> Delta | None:
    j = s.job
    if isinstance(j, ScoreJob):
        j.done, j.error = True, msg
        return None
    j.result = Completion(seq=s.id, token_ids=list(s.tokens[j.start:]), text=None, finish_reason="error",
                          counters=j.counters, error=msg, adapter=s.adapter.name if s.adapter else None)
    return Delta(s.id, [], "", finished=j.result)


def _ranked(all_lp: torch.Tensor, lp: torch.Tensor, k: int) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """Each scored token's rank (1 = the most likely) and the k most likely (token, log-probability)
    under `all_lp` (n, V); taken from the same tensor as the scores, so a scored token that is the
    most likely has exactly its score among the alternatives."""
    ranks = ((all_lp > lp[:, None]).sum(-1) + 1).tolist()
    if k == 0:
        return ranks, [[] for _ in ranks]
    alts = all_lp.topk(min(k, all_lp.shape[-1]), dim=-1)
    return ranks, [list(zip(i, v)) for i, v in zip(alts.indices.tolist(), alts.values.tolist())]


def _draw(gen: list[tuple[Seq, int]], logits: torch.Tensor, eos_token_ids: set[int]) -> list[tuple[Seq, int, object]]:
    """(sequence, sampled token, its TokenLogprob or None) per generating sequence; changes nothing."""
    params = [s.job.params for s, _ in gen]
    constrained = [i for i, (s, _) in enumerate(gen) if s.job.grammar is not None]
    if not constrained and len(gen) == logits.shape[0] and all(at == i for i, (_, at) in enumerate(gen)):
        lg = logits  # every row, in order, and nothing below writes to it: no copy
    else:
        lg = logits[torch.tensor([at for _, at in gen], device=logits.device)]  # (B, V)
    x = lg
    if constrained:  # else the batch pays nothing for structured outputs
        # `lg` is already a copy of the model's logits; a copy of it keeps those rows' logprobs the model's
        raw = any(params[i].logprobs is not None for i in constrained)
        x = mask_logits(lg, constrained, [gen[i][0].job.grammar for i in constrained], inplace=not raw)
    extra = [p.penalized or p.min_tokens > 0 for p in params]
    if any(extra):  # else the batch pays nothing for penalties and min_tokens
        outputs = [s.tokens[s.job.start:] if e else () for (s, _), e in zip(gen, extra)]
        prompts = [s.job.prompt_tensor(s.tokens, lg.device) if p.repetition_penalty != 1 else None
                   for (s, _), p in zip(gen, params)]
        x = penalize(x, params, outputs, prompts, eos_token_ids)
    toks = sample(x, params, [s.job.generator for s, _ in gen])
    want_lp = [p.logprobs is not None for p in params]
    lps = token_logprobs(lg, toks, max(p.logprobs or 0 for p in params)) if any(want_lp) else None
    out = []
    for i, ((s, _), tok) in enumerate(zip(gen, toks.tolist())):
        lp = None
        if lps is not None and want_lp[i]:
            lp = lps[i]
            lp.top = lp.top[: params[i].logprobs]
        out.append((s, tok, lp))
    return out
