"""`kilolora demo`: test-time strategies against greedy decoding on the embedded world.

Held-out problems go through each strategy (all problems of a strategy run together in one
executor, so their branches share engine steps); for each we measure accuracy, tokens computed
(prefilled + decoded), tokens reused from the KV cache, and wall time. Verification's cost in
best-of-n is its share of the engine's time against the sampling's (each batch's time is split
among its requests by tokens computed; verification batches hold only verifier calls), and its
share of computed tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from skills.tasks import Problem, parse_answer, problems

from . import strategies as st
from .executor import Executor
from .graph import Graph


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
    tot = {"prefilled": 0, "reused": 0, "decoded": 0}
    by_kind: dict[str, dict] = {}
    for r in runs:
        for k, v in r.trace.totals().items():
            tot[k] += v
        for kind, d in r.trace.tokens_by_kind().items():
            agg = by_kind.setdefault(kind, {"prefilled": 0, "reused": 0, "decoded": 0, "calls": 0, "backend_ms": 0.0})
            for k in agg:
                agg[k] += d[k]
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


def run_demo(world=None, n_problems: int = 200, n: int = 8, seed: int = 0, names=DEFAULT,
             progress: Callable[[str], None] | None = None, url: str | None = None) -> dict:
    """The demo's report (JSON-able); see the module docstring."""
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    if not isinstance(n_problems, int) or n_problems < 1:
        raise ValueError(f"--problems must be >= 1, got {n_problems!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be >= 1, got {n!r}")
    say = progress or (lambda msg: None)
    say("loading the world")
    # about 512 live branches at once (64 problems at n = 8): enough to fill the engine's batches,
    # few enough that their KV caches fit
    backend = None
    if url is not None:  # the same graphs against a server (`kilolora serve` on the same world)
        from .http_backend import HttpBackend

        backend = HttpBackend(url)
    ex = Executor.for_world(world, backend, max_runs=max(1, 512 // max(n, 8)))
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
