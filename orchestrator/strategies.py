"""Test-time strategies as graphs: greedy, verifier-guided best-of-n, tool insertion, step-level
backtracking and beam search with the self-evaluation skill, and the full agent that combines them.

They are written for worlds whose solutions are steps ending in `.` and an `Answer: N` line (the
default world), with skills named `verifier`, `self_eval` and `tool_selector`; every name is a
parameter. Each `*_graph` returns a `Graph`; `best_of_n(...)` also runs one on problems.

- best-of-n: sample n solutions in parallel from one prompt (the forks share its KV cache), score
  each with the verifier (an activated adapter: it reads the cached solution and computes only its
  invocation), keep the best (`max`) or the answer with the most verifier weight
  (`weighted_majority`; Li et al. 2023, "Making LLMs better reasoners with step-aware verifier").
- tools: at every step boundary the tool selector (activated) proposes `[CALC] expr [/CALC]` or
  nothing; a proposed call is computed by the safe calculator and inserted; the base continues.
- backtracking: after each step the self-evaluation skill scores it; a low score rewinds the
  sequence to the step's start and resamples it, up to a retry limit.
- beam search: k beams; each expands into m sampled next steps, scored by the self-evaluation
  skill; the k with the highest summed log-score survive (Xie et al. 2023, "Self-evaluation
  guided beam search for reasoning").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from skills.tasks import parse_answer

from .graph import END, AdapterArg, Append, Ask, Call, Fork, Generate, Graph, Join, Rewind, Score, State, Tool, \
    top, weighted_majority

STEP_STOP = ["."]
"""a step of the default world's solutions ends with `.`; the answer ends the sequence"""


class Solution(State):
    """State of the arithmetic strategies."""

    call: str = ""
    """the tool selector's proposal at the current step boundary"""
    step_score: float | None = None
    """self-evaluation of the last step"""
    log_score: float = 0.0
    """sum of the steps' log self-evaluation scores (beam search)"""
    attempt: int = 0
    """the full agent: 0 for the first solution, then one more per restart"""


def answer_of(state: State) -> int | None:
    return parse_answer(state.text) if state.finished else None


def greedy_graph(max_tokens: int = 72, adapter: AdapterArg = None, state: type[State] = Solution) -> Graph:
    g = Graph(state, "greedy")
    g.add("answer", Generate(adapter=adapter, max_tokens=max_tokens))
    return g


def best_of_n_graph(n: int = 8, generator: AdapterArg = None,
                    verifier: str | Callable[[State], str] | None = "verifier", aggregate: str = "max",
                    temperature: float = 1.0, max_tokens: int = 72, state: type[State] = Solution) -> Graph:
    """Fork n samples (from the base, or the `generator` adapter), score each with the verifier,
    join on `aggregate`: `max` (the highest score) or `weighted_majority` (the answer with the
    largest summed score). `verifier=None` with `weighted_majority` is plain majority vote. The
    generator and the verifier may be functions of the state (a `state` type with the fields
    they read: each run samples from its own task's adapter and is judged by its own verifier)."""
    if aggregate not in ("max", "weighted_majority"):
        raise ValueError(f"aggregate must be 'max' or 'weighted_majority', got {aggregate!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if verifier is None and aggregate == "max":
        raise ValueError("aggregate='max' needs a verifier")
    select = top(1) if aggregate == "max" else weighted_majority(answer_of, "score" if verifier else None)
    g = Graph(state, f"best_of_{n}_{aggregate if verifier else 'majority'}")
    g.add("fork", Fork(n))
    g.add("sample", Generate(adapter=generator, max_tokens=max_tokens, temperature=temperature))
    g.add("pick", Join(select=select))
    if verifier:
        g.add("verify", Score(verifier))
        g.chain("fork", "sample", "verify", "pick")
    else:
        g.chain("fork", "sample", "pick")
    return g


def _tool_steps(g: Graph, selector: str, first: str, after_step: str, max_step_tokens: int = 40,
                temperature=0.0, adapter=None) -> None:
    """select -> tool -> step, then `after_step`; entry at `first`."""
    g.add(first, Ask(selector, into="call"))
    g.add("tool", Tool("calculator", call="call"))
    g.add("step", Generate(adapter=adapter, stop=STEP_STOP, max_tokens=max_step_tokens, temperature=temperature))
    g.add("space", Append(" "))
    g.chain(first, "tool", "step")
    g.edge("space", first)
    g.edge("step", after_step)


def tool_graph(selector: str = "tool_selector") -> Graph:
    """The base solves step by step; before each step the tool selector may call the calculator."""
    g = Graph(Solution, "tools")
    _tool_steps(g, selector, "select", "next")
    g.add("next", Call(_noop))
    g.edge("next", END, when=_stopped)
    g.edge("next", "space")
    return g


def chat_graph(adapter=None, tools: bool = True, verifier: str | None = "verifier",
               selector: str = "tool_selector", max_tokens: int = 160) -> Graph:
    """One chat turn: the answer step by step (by the base, or `adapter`: a name or a function of
    the state), with the tool selector proposing calculator calls before each step when `tools`;
    then the verifier's score of the answer when `verifier` is set."""
    g = Graph(Solution, "chat")
    if tools:
        _tool_steps(g, selector, "select", "next", adapter=adapter)
        g.add("next", Call(_noop))
        g.edge("next", "verify" if verifier else END, when=_stopped)
        g.edge("next", "space")
    else:
        g.add("answer", Generate(adapter=adapter, max_tokens=max_tokens))
        if verifier:
            g.edge("answer", "verify")
    if verifier:
        g.add("verify", Score(verifier))
    return g


def backtrack_graph(checker: str = "self_eval", threshold: float = 0.5, max_retries: int = 2,
                    tools: bool = False, selector: str = "tool_selector") -> Graph:
    """Step by step; each step is scored by `checker`, and a step scoring under `threshold` is
    rewound and resampled (greedy first, then temperature 1) up to `max_retries` times."""
    g = Graph(Solution, "backtrack" + ("_tools" if tools else ""))
    _add_checked_steps(g, checker, threshold, max_retries, tools, selector)
    g.edge("next", END, when=_stopped)
    g.edge("next", "space")
    return g


def agent_graph(checker: str = "self_eval", verifier: str = "verifier", selector: str = "tool_selector",
                threshold: float = 0.5, max_retries: int = 2, verify_threshold: float = 0.5,
                max_restarts: int = 1) -> Graph:
    """The full agent: tool insertion, step checks with backtracking, and a final verification
    that restarts the whole solution (sampling) when the verifier rejects it."""
    g = Graph(Solution, "agent")
    g.add("begin", Call(lambda s: {"attempt": s.retry}))
    _add_checked_steps(g, checker, threshold, max_retries, True, selector)
    g.edge("begin", "select")
    g.add("verify", Score(verifier))
    g.add("restart", Rewind(to="begin", max_retries=max_restarts))
    g.edge("next", "verify", when=_stopped)
    g.edge("next", "space")
    g.edge("verify", "restart", when=lambda s: s.score is not None and s.score < verify_threshold)
    return g


def _add_checked_steps(g: Graph, checker: str, threshold: float, max_retries: int, tools: bool,
                       selector: str) -> None:
    sample_on_retry = _sample_on_retry
    if tools:
        _tool_steps(g, selector, "select", "check", temperature=sample_on_retry)
    else:
        g.add("step", Generate(stop=STEP_STOP, max_tokens=40, temperature=sample_on_retry))
        g.add("space", Append(" "))
        g.edge("space", "step")
        g.edge("step", "check")
    g.add("check", Score(checker, into="step_score"))
    g.add("retry", Rewind(to="select" if tools else "step", max_retries=max_retries))
    g.add("next", Call(_noop))
    g.edge("check", "retry", when=lambda s: s.step_score is not None and s.step_score < threshold
           and not _is_answer(s))
    g.edge("check", "next")
    g.edge("retry", "next")


def beam_search_graph(beams: int = 3, expand: int = 3, checker: str = "self_eval", temperature: float = 1.0,
                      max_step_tokens: int = 40) -> Graph:
    """Step-level beam search scored by `checker` (see the module docstring)."""
    g = Graph(Solution, f"beam_{beams}x{expand}")
    g.add("expand", Fork(n=lambda s: 1 if _stopped(s) else expand, group="beam"))
    g.add("step", Generate(stop=STEP_STOP, max_tokens=max_step_tokens, temperature=temperature))
    g.add("check", Score(checker, into="step_score"))
    g.add("acc", Call(_accumulate))
    g.add("prune", Join(select=top(beams, "log_score"), done=lambda states: all(_stopped(s) for s in states),
                        then=END))
    g.add("space", Append(lambda s: "" if _stopped(s) else " "))
    g.edge("expand", "prune", when=_stopped)
    g.chain("expand", "step", "check", "acc", "prune", "space", "expand")
    return g


def best_of_n(problems: str | Sequence[str], n: int = 8, generator: str | None = None, verifier: str = "verifier",
              aggregate: str = "max", executor=None, seed: int = 0, **kw):
    """Verifier-guided best-of-n on one problem (a Run) or several (a list of Runs, run together);
    `executor` defaults to the embedded world's, in-process."""
    from .world import world_executor

    executor = executor if executor is not None else world_executor()
    g = best_of_n_graph(n, generator, verifier, aggregate, **kw)
    runs = executor.run_many(g, [problems] if isinstance(problems, str) else list(problems), seed=seed)
    return runs[0] if isinstance(problems, str) else runs


def _noop(state: State) -> None:
    return None


def _stopped(s: State) -> bool:
    """The solution ended (end-of-sequence), or a step ran out of tokens without its `.`."""
    return s.finished or bool(s.last) and not s.last.endswith(".") and not s.last.endswith("]")


def _is_answer(s: State) -> bool:
    return "Answer:" in s.last


def _sample_on_retry(s: Solution) -> float:
    """Greedy on the first try of a step; sample when it is retried or the solution restarted."""
    return 0.0 if s.retry == 0 and s.attempt == 0 else 1.0


def _accumulate(s: Solution) -> dict:
    p = s.step_score if s.step_score is not None else 0.5
    return {"log_score": s.log_score + math.log(max(p, 1e-9))}

