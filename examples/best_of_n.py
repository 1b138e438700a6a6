"""Verifier-guided best-of-n on the embedded world: 8 samples from one prompt (the forks share its
KV cache), each scored by the verifier, an activated adapter that reads the cached solution and
computes only its own few tokens; then the same samples with plain majority vote, and greedy.

    python examples/best_of_n.py
"""

from __future__ import annotations

from orchestrator.strategies import answer_of, best_of_n, best_of_n_graph, greedy_graph
from orchestrator.world import world_executor

ex = world_executor()  # the embedded world, served in-process: no download
problem = "37*49+12"
print(f"problem: {problem} (answer {37 * 49 + 12})")

greedy = ex.run(greedy_graph(), problem)
print(f"greedy:          {greedy.text}")

run = best_of_n(problem, n=8, executor=ex, seed=0)
print(f"best-of-8:       {run.text}   (verifier score {run.state.score:.2f})")
samples = {e["branch"]: e["output"] for e in run.trace.of("node") if e["node"] == "sample"}
(join,) = run.trace.of("join")
for branch, score in zip(join["branches"], join["scores"]):
    kept = "  <- kept" if branch in join["kept"] else ""
    print(f"  sample {branch}: P(correct) = {score:.2f}  {samples[branch]}{kept}")

verify = [e for e in run.trace.of("node") if e["node"] == "verify"]
print(f"each verifier call computed {verify[0]['tokens']['prefilled']} tokens and reused "
      f"{verify[0]['tokens']['reused']} from the KV cache")

majority = ex.run(best_of_n_graph(8, verifier=None, aggregate="weighted_majority"), problem, seed=0)
print(f"majority of 8:   {majority.text}   (same samples: same seed)")
print(f"answers: greedy {answer_of(greedy.state)}, best-of-8 {answer_of(run.state)}, majority {answer_of(majority.state)}")
