"""A graph of your own: draft an answer, read it with a plain-Python node, let the verifier judge
it, and backtrack (resample) while the verifier rejects it, at most twice.

    python examples/custom_graph.py
"""

from __future__ import annotations

from orchestrator import Call, Generate, Graph, Rewind, Score, State
from orchestrator.world import world_executor
from skills.tasks import parse_answer


class Answer(State):
    answer: int | None = None
    digits: int = 0


def read_answer(s: Answer) -> dict:
    """Plain Python: parse the model's answer into typed state."""
    a = parse_answer(s.text)
    return {"answer": a, "digits": len(str(abs(a))) if a is not None else 0}


g = Graph(Answer, "draft-verify-retry")
g.add("draft", Generate(max_tokens=72, temperature=lambda s: 0.0 if s.retry == 0 else 1.0))
g.add("read", Call(read_answer))
g.add("verify", Score("verifier"))
g.add("retry", Rewind(to="draft", max_retries=2))
g.chain("draft", "read", "verify")
g.edge("verify", "retry", when=lambda s: s.score < 0.5 or s.answer is None)

print(g.mermaid())
ex = world_executor()  # the world's verifier reads the calculator's verdicts: the world wires them
for problem in ("37*49+12", "12*4+7"):
    run = ex.run(g, problem, seed=1)
    s = run.state
    print(f"\n{problem}: {run.text}")
    print(f"  answer {s.answer} ({s.digits} digits), verifier {s.score:.2f}, "
          f"{len(run.trace.of('rewind'))} rewinds, tokens {run.trace.totals()}")
    run.trace.render()
