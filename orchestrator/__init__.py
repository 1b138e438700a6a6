"""Test-time orchestration over the kilolora engine: agent graphs, an executor, strategies, tools.

```python
from orchestrator import Graph, State, Generate, Score, Rewind
from orchestrator.world import world_executor
g = Graph(State)
g.add("draft", Generate(stop=["."]))
g.add("check", Score("self_eval"))
g.add("retry", Rewind(to="draft"))
g.chain("draft", "check")
g.edge("check", "retry", when=lambda s: s.score < 0.5)
run = world_executor().run(g, "37*49+12")   # the embedded world, in-process
print(run.text); run.trace.render()
```

Modules: `graph` (state, nodes, edges), `executor` (runs graphs, batching branches), `backend`
(the Backend protocol and the in-process engine backend), `trace`, `tools` (the tool protocol,
markup and JSON call formats, the safe calculator): the generic core, which knows no world.
On top of it: `world` (the default world's wiring: the calculator's markup, the verifier's
evidence, factories), `strategies` (best-of-n, tools, backtracking, beam search, the full agent),
`chat`, `demo`, `cli`.
This package is the top of the import chain `orchestrator → skills → serving → compression`.
"""

from .backend import Backend, EngineBackend, GenRequest, GenResult, Tokens
from .executor import Executor, Run
from .graph import END, Append, Ask, Call, Fork, Generate, Graph, GraphError, Join, Rewind, Score, State, Tool, top, \
    weighted_majority
from .tools import JsonTool, MarkupTool, ToolCall, ToolResult, ToolSpec
from .trace import Trace

__all__ = ["Backend", "EngineBackend", "GenRequest", "GenResult", "Tokens", "Executor", "Run", "END", "Append", "Ask",
           "Call", "Fork", "Generate", "Graph", "GraphError", "Join", "Rewind", "Score", "State", "Tool", "top",
           "weighted_majority", "JsonTool", "MarkupTool", "ToolCall", "ToolResult", "ToolSpec", "Trace"]
