"""One engine step: pick tokens under a budget, secure blocks, run the forward, sample, stream.

Sequences are served oldest first. Each first takes what the prefix cache holds (full blocks keyed
by tokens and adapter uids), then gets a chunk of its remaining tokens (chunked prefill; decode is
a chunk of one). A block about to be written that others share is copied first (copy-on-write).
When blocks run out, the youngest running sequence is preempted (its blocks released, recomputed
later, mostly from the prefix cache); a job that cannot fit even alone ends with a clear error.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .blocks import OutOfBlocks, block_key
from .model import AttnGroup, ForwardBatch
from .sampling import sample, token_logprobs
from .sequence import Completion, Delta, GenJob, ScoreJob, Seq

if TYPE_CHECKING:
    from .engine import Engine


def _match_prefix(e: Engine, s: Seq, limit: int) -> None:
    """Take full blocks from the prefix cache while positions stay below `limit`."""
    bs = e.block_size
    j = s.num_computed // bs
    if s.num_computed % bs:
        return  # a partial block is ours to finish
    while (j + 1) * bs <= limit:
        key = block_key(s.keys[j - 1] if j else None, tuple(s.tokens[j * bs:(j + 1) * bs]),
                        tuple(s.adapters[j * bs:(j + 1) * bs]))
        b = e.blocks.lookup(key)
        if b is None:
            return
        if j < len(s.blocks):
            e.blocks.decref(s.blocks[j])
            s.blocks[j] = b
        else:
            s.blocks.append(b)
        s.keys.append(key)
        s.num_computed = (j + 1) * bs
        s.job.counters.cached += bs
        j += 1


def _release(e: Engine, s: Seq) -> None:
    """Preempt: give back every block; the job restarts from the prefix cache."""
    for b in s.blocks:
        e.blocks.decref(b)
    s.blocks.clear()
    s.keys.clear()
    s.num_computed = 0


def _secure_blocks(e: Engine, s: Seq, end: int) -> None:
    """Make blocks cover positions [num_computed, end) and be private where they will be written."""
    bs = e.block_size
    if s.num_computed % bs and e.blocks.is_shared(s.blocks[-1]):
        new = e.blocks.allocate()
        old = s.blocks[-1]
        src = torch.arange(old * bs, old * bs + bs, device=e.cache.k.device)
        dst = torch.arange(new * bs, new * bs + bs, device=e.cache.k.device)
        e.cache.k[:, dst] = e.cache.k[:, src]
        e.cache.v[:, dst] = e.cache.v[:, src]
        e.blocks.decref(old)
        s.blocks[-1] = new
    while len(s.blocks) < math.ceil(end / bs):
        s.blocks.append(e.blocks.allocate())


def _fail(s: Seq, msg: str) -> Delta | None:
    j = s.job
    if isinstance(j, ScoreJob):
        j.done, j.error = True, msg
        return None
    j.result = Completion(seq=s.id, token_ids=list(s.tokens[j.start:]), text=None, finish_reason="error",
                          counters=j.counters, error=msg, adapter=s.adapter.name if s.adapter else None)
    return Delta(s.id, [], "", finished=j.result)


def _schedule(e: Engine, active: list[Seq], deltas: list[Delta]) -> list[tuple[Seq, int, int]]:
    budget = e.max_batch_tokens
    plan: list[tuple[Seq, int, int]] = []
    queue = list(active)
    while queue and budget > 0:
        s = queue[0]
        if s.num_computed > s.logits_from():  # e.g. after a rewind: recompute to get logits
            e._invalidate(s, s.logits_from())
        _match_prefix(e, s, s.logits_from())
        start = s.num_computed
        end = min(s.need_end(), start + budget)
        try:
            _secure_blocks(e, s, end)
        except OutOfBlocks:
            # Preempt the youngest waiting sequence that holds blocks; never one already planned.
            victim = next((v for v in reversed(queue[1:]) if v.blocks), None)
            if victim is not None:
                _release(e, victim)
                continue
            if not plan:
                d = _fail(s, f"KV cache full: {e.blocks.num_used} of {e.blocks.num_blocks} blocks are held by "
                             f"{len(e._seqs)} open sequences; close idle sequences or raise kv_cache_tokens")
                if d is not None:
                    deltas.append(d)
            break
        queue.pop(0)
        plan.append((s, start, end))
        budget -= end - start
    return plan


def _build(e: Engine, plan: list[tuple[Seq, int, int]]) -> tuple[ForwardBatch, list[int]]:
    bs, dev = e.block_size, e.model.device
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
    windows = set(e.config.sliding_windows)
    groups = []
    if decode:
        lens = torch.tensor([end for _, _, _, end in decode], device=dev)  # (B,)
        width = max(len(s.blocks) for s, *_ in decode)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s, *_ in decode], device=dev)
        key_slots = (table[:, :, None] * bs + torch.arange(bs, device=dev)).view(len(decode), -1)
        key_slots = key_slots[:, : int(lens.max())].contiguous()  # (B, L)
        kpos = torch.arange(key_slots.shape[1], device=dev)[None]  # (1, L)
        qpos = (lens - 1)[:, None]  # (B, 1)
        masks = {w: _mask(kpos, qpos, lens[:, None], w)[:, None, None, :] for w in windows}
        q_rows = torch.tensor([r for _, r, _, _ in decode], device=dev)[:, None]
        groups.append(AttnGroup(q_rows, key_slots, masks, covers_all=not prefill and len(decode) == row))
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
        groups.append(AttnGroup(q_rows, key_slots, masks, covers_all=len(plan) == 1))
    batch = ForwardBatch(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                         torch.tensor(slots, device=dev), groups)
    return batch, uids


def _mask(kpos, qpos, length, window):
    m = (kpos <= qpos) & (kpos < length)
    if window is not None:
        m &= kpos > qpos - window
    return m


def run_step(e: Engine) -> list[Delta]:
    active = sorted((s for s in e._seqs.values() if e._active(s)), key=lambda s: s.arrival)
    if not active:
        return []
    deltas: list[Delta] = []
    plan = _schedule(e, _fair(active), deltas)
    if not plan:
        return deltas
    try:
        deltas += _execute(e, plan)
    except Exception as err:  # noqa: BLE001 - isolate it: one bad request must not fail the batch
        if len(plan) == 1:
            d = _fail(plan[0][0], f"{type(err).__name__}: {err}")
            deltas += [d] if d is not None else []
        else:  # nothing was committed: run each sequence alone, failing only those that raise
            for item in plan:
                try:
                    deltas += _execute(e, [item])
                except Exception as one:  # noqa: BLE001
                    d = _fail(item[0], f"{type(one).__name__}: {one}")
                    deltas += [d] if d is not None else []
    return deltas


def _fair(active: list[Seq]) -> list[Seq]:
    """Interleave request groups (oldest first within each): the k-th sequence of every group comes
    before the (k+1)-th of any, so one request with thousands of sequences cannot starve the others
    of batch slots (nor, being last in the order, of KV blocks: preemption takes from the tail).
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


def _execute(e: Engine, plan: list[tuple[Seq, int, int]]) -> list[Delta]:
    """Forward the plan, then commit it. Everything that can raise on one request's account (the
    forward, the logits, sampling) runs before any sequence changes, so a failed plan can be
    retried in parts; what runs after is per sequence."""
    batch, uids = _build(e, plan)
    hidden = e.model.forward(batch, e.cache, e.registry.batch(uids))
    rows, owners = [], []
    row = 0
    for s, start, end in plan:
        if isinstance(s.job, GenJob):
            if end == len(s.tokens):
                rows.append(row + end - start - 1)
                owners.append((s, "gen", None))
        else:
            lo, hi = max(start, s.job.logits_from), end
            if hi > lo:
                rows.extend(range(row + lo - start, row + hi - start))
                owners.append((s, "score", (lo, hi)))
        row += end - start
    logits = e.model.logits(hidden[torch.tensor(rows, device=hidden.device)]) if rows else None
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
            lp = logits[at: at + n].log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            scores.append((s, lp.tolist()))
            at += n
    sampled = _draw(e, gen, logits) if gen else []
    # Commit: from here on nothing raises for the batch.
    e.steps += 1
    for s, start, end in plan:
        job = s.job
        if isinstance(job, GenJob):
            job.counters.prefilled += end - start - min(job.pending, end - start)
            job.pending = 0
        else:
            job.counters.prefilled += end - start
        _commit(e, s, end)
    for s, lps in scores:
        s.job.scores.extend(lps)
    deltas = []
    for s, tok, lp in sampled:
        try:
            deltas.append(_append(e, s, tok, lp))
        except Exception as err:  # noqa: BLE001 - e.g. a stop check that fails on this request's text
            d = _fail(s, f"{type(err).__name__}: {err}")
            deltas += [d] if d is not None else []
    for s, _, _ in plan:
        if isinstance(s.job, ScoreJob) and s.num_computed >= s.need_end():
            s.job.done = True
    return deltas


def _commit(e: Engine, s: Seq, end: int) -> None:
    """Advance the computed mark and key every block that became full."""
    bs = e.block_size
    s.num_computed = end
    for j in range(len(s.keys), end // bs):
        key = block_key(s.keys[j - 1] if j else None, tuple(s.tokens[j * bs:(j + 1) * bs]),
                        tuple(s.adapters[j * bs:(j + 1) * bs]))
        e.blocks.register(s.blocks[j], key)
        s.keys.append(key)


def _draw(e: Engine, gen: list[tuple[Seq, int]], logits: torch.Tensor) -> list[tuple[Seq, int, object]]:
    """(sequence, sampled token, its TokenLogprob or None) per generating sequence; changes nothing."""
    rows = torch.tensor([at for _, at in gen], device=logits.device)
    lg = logits[rows]  # (B, V)
    params = [s.job.params for s, _ in gen]
    toks = sample(lg, params, [s.job.generator for s, _ in gen])
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


def _append(e: Engine, s: Seq, tok: int, lp) -> Delta:
    job = s.job
    s.tokens.append(tok)
    s.adapters.append(s.uid_at(len(s.tokens) - 1))
    job.pending = 1
    job.counters.decoded += 1
    if lp is not None:
        job.logprobs.append(lp)
    return _finish_check(e, s, tok)


def _finish_check(e: Engine, s: Seq, tok: int) -> Delta:
    job, p = s.job, s.job.params
    out = s.tokens[job.start:]
    reason, stop_reason = None, None
    if tok in p.stop_token_ids:
        reason, stop_reason = "stop", tok
    elif tok in e.eos_token_ids and not p.ignore_eos:
        reason, stop_reason = "stop", tok
    text = None
    if e.tokenizer is not None:
        text = e.tokenizer.decode(out, skip_special_tokens=True)
        if p.stop:
            hits = [(text.find(x), x) for x in p.stop if x in text]
            if hits:
                cut, which = min(hits)
                text, reason, stop_reason = text[:cut], "stop", which
    if reason is None and (len(out) >= p.max_tokens or len(s.tokens) >= e.max_model_len):
        reason = "length"
    # Hold back text that may be the start of a stop string or an incomplete character.
    hold = 0
    if reason is None and text is not None:
        hold = max((len(x) - 1 for x in p.stop), default=0)
        while hold < len(text) and text[len(text) - hold - 1: len(text) - hold] == "\ufffd":
            hold += 1
    new_tokens = out[job.emitted_tokens:]
    delta_text = ""
    if text is not None:
        visible = len(text) - hold if reason is None else len(text)
        delta_text = text[job.emitted_text: max(visible, job.emitted_text)]
        job.emitted_text = max(visible, job.emitted_text)
    job.emitted_tokens = len(out)
    new_lp = job.logprobs[-1:] if p.logprobs is not None else None
    if reason is not None:
        job.result = Completion(seq=s.id, token_ids=list(out), text=text, finish_reason=reason,
                                stop_reason=stop_reason, logprobs=list(job.logprobs) if p.logprobs is not None else None,
                                counters=job.counters, adapter=s.adapter.name if s.adapter else None)
        if s.owned:  # generate()/stream() drop the sequence anyway: free its blocks for the others now
            _release(e, s)
    return Delta(s.id, new_tokens, delta_text, new_lp, job.result)
