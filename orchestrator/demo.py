"""`kilolora demo`: test-time strategies against greedy decoding on the embedded world, then the
task bank at work.

Held-out problems go through each strategy (all problems of a strategy run together in one
executor, so their branches share engine steps); for each we measure accuracy, tokens computed
(prefilled + decoded), tokens reused from the KV cache, and wall time. Verification's cost in
best-of-n is its share of the engine's time against the sampling's (each batch's time is split
among its requests by tokens computed; verification batches hold only verifier calls), and its
share of computed tokens.

The bank part (`bank=True`):

- one user per bank entry, each on its own adapter, all in one backend call (one engine batch
  in-process): a task entry transforms a held-out input (greedy), a per-task verifier judges a
  held-out candidate (P(yes) > 0.5 against the label). The same requests on the base alone, and
  on the uncompressed adapters when the world has them (else the build's recorded figure);
- decode throughput of that load on the bank against the base alone (an engine with no bank,
  the comparator users have without kilolora's bank): every request decodes the same
  number of tokens past its end-of-sequence, prefill excluded, the two alternating in one
  process, best of `repeats` each (in-process only: over HTTP the engine is the server's);
- the per-task verifiers as test-time judges: for each task that has one, best-of-n samples of
  the task adapter, picked by its own verifier from the bank, against the adapter's greedy
  answer, as graphs (`TaskState`, `Generate(adapter=f(state))`, `Score(f(state))`). A task
  adapter is a standard LoRA, so the KV it wrote is not the base's: its verifier (activated,
  reading base KV) recomputes the answer and reuses the prompt's cached blocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from skills.spec import yes_probability
from skills.tasks import Problem, Transform, parse_answer, problems

from . import strategies as st
from .backend import GenRequest
from .executor import Executor
from .graph import Graph, State


@dataclass
class Strategy:
    name: str
    description: str
    graph: Callable[[int], Graph]
    """n -> graph"""


STRATEGIES = {
    "greedy": Strategy("greedy", "the base model alone, greedy", lambda n: st.greedy_graph()),
    "majority": Strategy("majority", "n samples, majority vote on the answer (no verifier)",
                         lambda n: st.best_of_n_graph(n, aggregate="weighted_majority", verifier=None)),
    "best_of_n": Strategy("best_of_n", "n samples, the verifier picks (max score)",
                          lambda n: st.best_of_n_graph(n, aggregate="max")),
    "weighted": Strategy("weighted", "n samples, verifier-weighted majority on the answer",
                         lambda n: st.best_of_n_graph(n, aggregate="weighted_majority")),
    "tools": Strategy("tools", "tool selector + calculator at each step", lambda n: st.tool_graph()),
    "backtrack": Strategy("backtrack", "step checks (self-eval) with backtracking", lambda n: st.backtrack_graph()),
    "beam": Strategy("beam", "step-level beam search (3 beams x 3) scored by self-eval",
                     lambda n: st.beam_search_graph()),
    "agent": Strategy("agent", "tools + step checks with backtracking + verifier with restart",
                      lambda n: st.agent_graph()),
}
DEFAULT = ("greedy", "majority", "best_of_n", "weighted", "backtrack", "beam", "tools", "agent")


def run_strategy(ex: Executor, graph: Graph, probs: list[Problem], seed: int) -> tuple[dict, list]:
    t0 = time.perf_counter()
    runs = ex.run_many(graph, [p.question for p in probs], seed=seed)
    wall = time.perf_counter() - t0
    correct = [st.answer_of(r.state) == p.answer for r, p in zip(runs, probs)]
    tot, by_kind = _token_totals(runs)
    sampled = [[e.get("output", "") for e in r.trace.of("node") if e["node"] == "sample"] for r in runs]
    row = {"graph": graph.name, "accuracy": sum(correct) / len(probs), "correct": sum(correct),
           "tokens_computed": tot["prefilled"] + tot["decoded"], "tokens_reused": tot["reused"], **tot,
           "wall_s": round(wall, 3), "by_kind": by_kind,
           "tool_calls": sum(len(r.trace.of("tool")) for r in runs),
           "adapter_switches": sum(len(r.trace.of("adapter")) for r in runs),
           "rewinds": sum(len(r.trace.of("rewind")) for r in runs)}
    if any(sampled):  # the samples' ceiling: a problem counts if any of its samples is right
        row["pass_at_n"] = sum(any(parse_answer(t) == p.answer for t in ts) for ts, p in zip(sampled, probs)) / len(probs)
    return row, list(zip(runs, correct))


def _token_totals(runs) -> tuple[dict, dict[str, dict]]:
    """Tokens prefilled / reused / decoded over the runs' traces, in all and per node kind."""
    tot = {"prefilled": 0, "reused": 0, "decoded": 0}
    by_kind: dict[str, dict] = {}
    for r in runs:
        for k, v in r.trace.totals().items():
            tot[k] += v
        for kind, d in r.trace.tokens_by_kind().items():
            agg = by_kind.setdefault(kind, {"prefilled": 0, "reused": 0, "decoded": 0, "calls": 0, "backend_ms": 0.0})
            for k in agg:
                agg[k] += d[k]
    return tot, by_kind


def run_demo(world=None, n_problems: int = 200, n: int = 8, seed: int = 0, names=DEFAULT,
             progress: Callable[[str], None] | None = None, url: str | None = None, bank: bool = True) -> dict:
    """The demo's report (JSON-able); see the module docstring. `bank`: also run the bank part
    (`report["bank"]`, see `run_bank`)."""
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    if not isinstance(n_problems, int) or n_problems < 1:
        raise ValueError(f"--problems must be >= 1, got {n_problems!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be >= 1, got {n!r}")
    say = progress or (lambda msg: None)
    say("loading the world")
    from skills.world import World

    from .world import world_backend, world_executor

    world = world if world is not None else World.load()
    live_full = bank and url is None and world.has_uncompressed()
    # about 512 live branches at once (64 problems at n = 8): enough to fill the engine's batches,
    # few enough that their KV caches fit
    backend = None
    if url is not None:  # the same graphs against a server (`kilolora serve` on the same world)
        from .http_backend import HttpBackend

        backend = HttpBackend(url)
    elif live_full:  # the original task adapters beside the bank, as `full/<task>`
        backend = world_backend(world, uncompressed=True)
    ex = world_executor(world, backend, max_runs=max(1, 512 // max(n, 8)))
    probs = problems(n_problems, seed + 101, "test")  # the held-out split `kilolora world eval` uses
    report: dict = {"problems": n_problems, "n": n, "seed": seed, "backend": url or "in-process", "strategies": {}}
    example = None
    for name in names:
        say(f"{name}: {STRATEGIES[name].description}")
        row, runs = run_strategy(ex, STRATEGIES[name].graph(n), probs, seed)
        row["description"] = STRATEGIES[name].description
        report["strategies"][name] = row
        if name == "agent" or (example is None and name == names[-1]):
            example = _pick_example(runs, probs)
    if "greedy" in report["strategies"]:
        g = report["strategies"]["greedy"]["accuracy"]
        for row in report["strategies"].values():
            row["vs_greedy"] = round(row["accuracy"] - g, 4)
    if "best_of_n" in names:
        bon = report["strategies"]["best_of_n"]
        score, gen = bon["by_kind"].get("score", {}), bon["by_kind"].get("generate", {})
        fork = bon["by_kind"].get("fork", {})
        gen_ms = gen.get("backend_ms", 0.0) + fork.get("backend_ms", 0.0)  # sampling: prompt + solutions
        gen_tokens = sum(d.get("prefilled", 0) + d.get("decoded", 0) for d in (gen, fork))
        calls = max(score.get("calls", 0), 1)
        report["verification"] = {
            "calls": score.get("calls", 0), "prefilled": score.get("prefilled", 0), "reused": score.get("reused", 0),
            "prefilled_per_call": round(score.get("prefilled", 0) / calls, 2),
            "reused_per_call": round(score.get("reused", 0) / calls, 2),
            "backend_ms": round(score.get("backend_ms", 0.0), 1), "generation_backend_ms": round(gen_ms, 1),
            "time_share": round(score.get("backend_ms", 0.0) / gen_ms, 4) if gen_ms else None,
            "tokens_share": round(score.get("prefilled", 0) / gen_tokens, 4) if gen_tokens else None,
        }
    if bank:
        report["bank"] = run_bank(ex, world, seed, uncompressed=live_full, progress=say)
    if example is not None:
        run, p = example
        report["example"] = {"problem": p.question, "answer": p.answer, "text": run.text,
                             "graph": run.trace.graph, "trace": run.trace.events}
    report["engine"] = ex.backend.engine.stats() if hasattr(ex.backend, "engine") else {}
    return report


def _pick_example(runs, probs):
    """A solved problem whose trace shows the most: tool calls first, then adapter switches."""
    solved = [(r, p) for (r, ok), p in zip(runs, probs) if ok]
    if not solved:
        return None
    return max(solved, key=lambda rp: (len(rp[0].trace.of("tool")) > 0, len(rp[0].trace.of("rewind")) > 0,
                                       -len(rp[0].trace.events)))


# ------------------------------------------------------------------------------------ the bank

TASK_TOKENS = 16
"""most tokens a task adapter writes (its outputs are at most 7 characters and the end)"""


class TaskState(State):
    """State of a task-family run."""

    task: str = ""
    """the bank entry of the task the user asked for, e.g. `replace-ab`"""


@dataclass
class BankRequest:
    """One user of the bank: an entry and what its request reads."""

    entry: str
    role: str
    """`task`: transform the message; `verifier`: judge the candidate answer after it"""
    prompt: str
    """the request's text (a verifier's: the conversation with the candidate, then its invocation)"""
    want: str | bool
    """a task's right output; for a verifier, whether the candidate is right"""


def bank_entries(world, max_entries: int | None = None) -> list[str]:
    """The bank entries to serve: all, or (`max_entries`, for tests) as many spread evenly over
    the task entries and the verifier entries, half each where there are enough."""
    if max_entries is not None and (not isinstance(max_entries, int) or max_entries < 1):
        raise ValueError(f"max_entries must be None or an integer >= 1, got {max_entries!r}")
    names = [t["name"] for t in world.tasks]
    if max_entries is None or max_entries >= len(names):
        return names
    tasks = [t["name"] for t in world.tasks if t["role"] == "task"]
    checks = [t["name"] for t in world.tasks if t["role"] != "task"]
    k_task = min(len(tasks), max_entries - min(len(checks), max_entries // 2))
    k_check = max_entries - k_task
    return _spread(tasks, k_task) + _spread(checks, k_check)


def _spread(xs: list, k: int) -> list:
    return [xs[i * len(xs) // k] for i in range(k)]


def bank_requests(world, tokenizer, entries: Sequence[str], seed: int = 0) -> list[BankRequest]:
    """One held-out request per entry: the inputs and candidates `kilolora world eval` draws
    (`skills.evaluate.task_items`, one per task), as text."""
    from skills import data
    from skills.evaluate import task_items

    keep = set(entries)
    items = task_items(world, data.Encoder(tokenizer), 1, seed, "test")
    suffix = {s.name: s.suffix for s in world.skills("verifier")}

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    out = [BankRequest(n, "task", text(p), want) for n, p, want in items.gen if n in keep]
    return out + [BankRequest(n, "verifier", text(c) + suffix[n], good) for n, c, good in items.chk if n in keep]


def serve_requests(backend, skills: dict, reqs: Sequence[BankRequest],
                   adapter_of: Callable[[str], str | None]) -> list[tuple[str | float, bool]]:
    """Every request under `adapter_of(entry)` (None: the base) in one backend call: tasks
    greedy, verifiers one scored token (P(yes), as `Score` reads it). (output or P(yes), right)
    per request."""
    seqs = [backend.open(r.prompt) for r in reqs]
    try:
        res = backend.generate([GenRequest(q, adapter_of(r.entry), TASK_TOKENS, 0.0) if r.role == "task" else
                                GenRequest(q, adapter_of(r.entry), 1, 0.0, logprobs=20) for q, r in zip(seqs, reqs)])
    finally:
        for q in seqs:
            backend.close(q)
    out: list[tuple[str | float, bool]] = []
    for r, x in zip(reqs, res):
        if r.role == "task":
            out.append((x.text, x.text == r.want))
        else:
            top = x.top_logprobs[0]
            p = yes_probability(top.get(skills[r.entry].yes, -math.inf), top.get(skills[r.entry].no, -math.inf))
            out.append((p, (p > 0.5) == r.want))
    return out


def prefilled(engine, prompts: Sequence[str], adapters: Sequence[str | None]) -> list[int]:
    """Open a sequence per prompt under its adapter, its context computed (all but the last
    token, which a job computes for its logits)."""
    seqs: list[int] = []
    try:
        for p, a in zip(prompts, adapters):
            seqs.append(engine.open(p, adapter=a))
        pre = [q for q in seqs if engine.submit_prefill(q)]
        failed = [c.error for c in (engine.wait(pre) if pre else []) if c.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"{len(failed)} prompts failed to prefill: {failed[0]}")
    except Exception:
        for q in seqs:
            engine.close(q)
        raise
    return seqs


def decode_pass(engine, parents: Sequence[int], steps: int) -> dict:
    """One pass: a fork of every prefilled sequence decodes `steps` tokens, all together (greedy,
    past the end-of-sequence). Timing starts once every fork has computed its prompt's last
    token, so each timed step decodes one token of every sequence (of as many as a step holds)."""
    from serving.sampling import SamplingParams

    seqs = [engine.fork(q)[0] for q in parents]
    try:
        for q in seqs:
            engine.submit(q, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
        started: set[int] = set()
        while len(started) < len(seqs) and any(engine.running(q) for q in seqs):
            started |= {d.seq for d in engine.step() if d.token_ids}
        tokens, t0 = 0, time.perf_counter()
        while any(engine.running(q) for q in seqs):
            tokens += sum(len(d.token_ids) for d in engine.step())
        dt = time.perf_counter() - t0
        failed = [c.error for c in engine.wait(seqs) if c.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"{len(failed)} of the throughput requests failed: {failed[0]}")
    finally:
        for q in seqs:
            engine.close(q)
    return {"tokens": tokens, "seconds": round(dt, 4), "tok_s": round(tokens / dt, 1) if dt > 0 else None}


def bank_throughput(engine, reqs: Sequence[BankRequest], decode_tokens: int = 4096, repeats: int = 3,
                    base_engine=None) -> dict:
    """Decode tokens/s of the requests on the bank (each on its entry, on `engine`) and on the
    base alone (on `base_engine`: the same base with no bank loaded, since on CPU a one-cluster
    bank folds its basis into the base weights and so taxes base tokens too; default `engine`):
    the same prompts, prefilled once each, and the same tokens per request, the two loads
    alternating, best of `repeats` each."""
    steps = max(2, min(32, math.ceil(decode_tokens / len(reqs))))
    prompts = [r.prompt for r in reqs]
    loads = {"base": [None] * len(reqs), "bank": [r.entry for r in reqs]}
    engines = {"base": base_engine if base_engine is not None else engine, "bank": engine}
    parents: dict[str, list[int]] = {}
    passes: dict[str, list[dict]] = {k: [] for k in loads}
    try:
        for k, adapters in loads.items():
            parents[k] = prefilled(engines[k], prompts, adapters)
        for _ in range(repeats):
            for k in loads:
                passes[k].append(decode_pass(engines[k], parents[k], steps))
    finally:
        for k, seqs in parents.items():
            for q in seqs:
                engines[k].close(q)
    best = {k: max(p["tok_s"] for p in ps) for k, ps in passes.items()}
    return {"requests": len(reqs), "distinct_adapters": len(set(loads["bank"])), "decode_tokens_per_request": steps,
            "tokens_per_pass": passes["bank"][0]["tokens"], "repeats": repeats, "bank_tok_s": best["bank"],
            "base_tok_s": best["base"], "ratio": round(best["bank"] / best["base"], 4), "passes": passes}


def verified_runs(ex: Executor, world, entries: Sequence[str] | None = None, n: int = 4, seed: int = 0):
    """Each task with a per-task verifier (among `entries`), on a held-out input: best-of-n of
    the task adapter's samples (T = 1) picked by its verifier from the bank, and the adapter's
    greedy answer. (cases: (initial state, right output), best-of-n runs, greedy runs, seconds
    of each), or None if the world has no per-task verifiers."""
    keep = set(entries) if entries is not None else None
    bank = {t["name"] for t in world.tasks if t["role"] == "task"}
    judge = {Transform.parse(t["task"]).name: t["name"] for t in world.tasks
             if t["role"] == "verifier" and (keep is None or t["name"] in keep)}
    judge = {task: v for task, v in judge.items() if task in bank}
    cases = []
    for task in judge:
        tr = Transform.parse(next(t["task"] for t in world.tasks if t["name"] == task))
        xs = tr.inputs(1, seed + 31, "test")
        if xs:
            cases.append((TaskState(prompt=tr.prompt(xs[0]), task=task), tr.apply(xs[0])))
    if not cases:
        return None
    states = [s for s, _ in cases]
    runner = Executor(ex.backend, ex.skills, ex.tools, max_runs=max(1, 1024 // n),  # about 1024 live branches
                      evidence=ex.evidence)
    bon = st.best_of_n_graph(n, generator=lambda s: s.task, verifier=lambda s: judge[s.task], aggregate="max",
                             max_tokens=TASK_TOKENS, state=TaskState)
    t0 = time.perf_counter()
    picked = runner.run_many(bon, states, seed=seed)
    t1 = time.perf_counter()
    greedy = runner.run_many(st.greedy_graph(TASK_TOKENS, adapter=lambda s: s.task, state=TaskState), states, seed=seed)
    t2 = time.perf_counter()
    return cases, picked, greedy, {"best_of_n": round(t1 - t0, 3), "greedy": round(t2 - t1, 3)}


def verified_summary(cases, picked, greedy, seconds: dict, n: int) -> dict:
    """Accuracy of best-of-n and of greedy, pass@n, and what the verifier calls computed."""
    ok_bon = [r.text == want for r, (_, want) in zip(picked, cases)]
    ok_greedy = [r.text == want for r, (_, want) in zip(greedy, cases)]
    sampled = [[e.get("output", "") for e in r.trace.of("node") if e["node"] == "sample"] for r in picked]
    _, by_kind = _token_totals(picked)
    score = by_kind.get("score", {})
    calls = max(score.get("calls", 0), 1)
    gen_tokens = sum(d["prefilled"] + d["decoded"] for k, d in by_kind.items() if k != "score")
    m = len(cases)
    return {"tasks": m, "n": n, "temperature": 1.0, "graph": picked[0].trace.graph,
            "greedy_accuracy": sum(ok_greedy) / m, "best_of_n_accuracy": sum(ok_bon) / m,
            "pass_at_n": sum(any(t == want for t in ts) for ts, (_, want) in zip(sampled, cases)) / m,
            "rescued": sum(b and not g for b, g in zip(ok_bon, ok_greedy)),
            "lost": sum(g and not b for b, g in zip(ok_bon, ok_greedy)),
            "verifier_calls": score.get("calls", 0), "prefilled": score.get("prefilled", 0),
            "reused": score.get("reused", 0), "decoded": score.get("decoded", 0),
            "prefilled_per_call": round(score.get("prefilled", 0) / calls, 2),
            "reused_per_call": round(score.get("reused", 0) / calls, 2),
            "tokens_share": round((score.get("prefilled", 0) + score.get("decoded", 0)) / gen_tokens, 4)
            if gen_tokens else None, "wall_s": seconds}


def run_bank(ex: Executor, world, seed: int = 0, *, uncompressed: bool = False, n: int = 4, repeats: int = 3,
             decode_tokens: int = 4096, max_entries: int | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """The bank part of the demo (see the module docstring): `users` (one request per entry in
    one batch: accuracy on the bank, the uncompressed adapters and the base; decode throughput)
    and `verifiers` (best-of-n picked by the per-task verifiers). `uncompressed`: the backend
    serves the original adapters as `full/<task>` (else the build's recorded figure is shown);
    `max_entries`: serve fewer entries (tests)."""
    say = progress or (lambda msg: None)
    entries = bank_entries(world, max_entries)
    tok = ex.backend.tokenizer if hasattr(ex.backend, "tokenizer") else world.tokenizer()
    reqs = bank_requests(world, tok, entries, seed)
    engine = getattr(ex.backend, "engine", None)
    variants: dict[str, Callable[[str], str | None]] = {"bank": lambda e: e, "base": lambda e: None}
    if uncompressed:
        variants["uncompressed"] = lambda e: "full/" + e
    accuracy, by_role, wall, wrong = {}, {}, {}, []
    steps = None
    for v, adapter_of in variants.items():
        say(f"the bank: {len(reqs)} users on {'their own adapters' if v != 'base' else 'the base'} ({v})")
        s0, t0 = (engine.steps if engine is not None else 0), time.perf_counter()
        out = serve_requests(ex.backend, ex.skills, reqs, adapter_of)
        wall[v] = round(time.perf_counter() - t0, 3)
        ok = [right for _, right in out]
        accuracy[v] = sum(ok) / len(ok)
        by_role[v] = {role: _mean([k for k, r in zip(ok, reqs) if r.role == role]) for role in ("task", "verifier")}
        if v == "bank":
            steps = engine.steps - s0 if engine is not None else None
            wrong = [r.entry for r, k in zip(reqs, ok) if not k]
    recorded = world.manifest.get("eval", {}).get("tasks", {}).get("accuracy")
    users = {"requests": len(reqs), "distinct_adapters": len({r.entry for r in reqs}), "bank_entries": len(world.tasks),
             "tasks": sum(r.role == "task" for r in reqs), "verifiers": sum(r.role == "verifier" for r in reqs),
             "accuracy": {**accuracy, "uncompressed": accuracy.get("uncompressed")}, "by_role": by_role,
             "uncompressed_source": "live" if uncompressed else
             ("recorded at build" if recorded and recorded.get("uncompressed") is not None else "not available"),
             "recorded_at_build": recorded, "engine_steps": steps, "wall_s": wall, "wrong": wrong}
    if engine is not None:
        say(f"the bank: decode throughput, {len(reqs)} requests on the bank vs the base")
        from serving.engine import Engine

        base_alone = Engine.from_pretrained(world.base_dir, kv_cache_tokens=engine.blocks.num_blocks * engine.block_size,
                                            block_size=engine.block_size, max_batch_tokens=engine.max_batch_tokens)
        users["throughput"] = bank_throughput(engine, reqs, decode_tokens, repeats, base_engine=base_alone)
        users["throughput"]["comparator"] = "the same base in an engine with no bank or adapters loaded"
        del base_alone
    else:
        users["throughput"] = None
        users["throughput_note"] = ("skipped over HTTP: the engine is the server's, out of this process "
                                    "(benchmarks/bench_server.py measures a server)")
    say(f"the bank: best-of-{n} picked by the per-task verifiers")
    runs = verified_runs(ex, world, entries, n, seed)
    return {"entries": len(entries), "users": users, "verifiers": verified_summary(*runs, n) if runs else None}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
