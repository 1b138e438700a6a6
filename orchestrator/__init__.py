"""Test-time orchestration over the kilolora engine: agent graphs, an executor, strategies, tools.

```python
from orchestrator import Executor, Graph, State, Generate, Score, Rewind
g = Graph(State)
g.add("draft", Generate(stop=["."]))
g.add("check", Score("self_eval"))
g.add("retry", Rewind(to="draft"))
g.chain("draft", "check")
g.edge("check", "retry", when=lambda s: s.score < 0.5)
run = Executor.for_world().run(g, "37*49+12")   # the embedded world, in-process
print(run.text); run.trace.render()
```

Modules: `graph` (state, nodes, edges), `executor` (runs graphs, batching branches), `backend`
(the Backend protocol and the in-process engine backend), `trace`, `strategies` (best-of-n,
tools, backtracking, beam search, the full agent), `tools` (the safe calculator), `cli`.
This package is the top of the import chain `orchestrator → skills → serving → compression`.
"""

from .backend import Backend, EngineBackend, GenRequest, GenResult, Tokens
from .executor import Executor, Run
from .graph import END, Append, Ask, Call, Fork, Generate, Graph, GraphError, Join, Rewind, Score, State, Tool, top, \
    weighted_majority
from .trace import Trace

__all__ = ["Backend", "EngineBackend", "GenRequest", "GenResult", "Tokens", "Executor", "Run", "END", "Append", "Ask",
           "Call", "Fork", "Generate", "Graph", "GraphError", "Join", "Rewind", "Score", "State", "Tool", "top",
           "weighted_majority", "Trace"]
