"""Tool insertion on the embedded world: at every step boundary the tool selector (an activated
adapter over the base's KV cache) proposes a calculator call or nothing; a proposed call is
computed by the safe calculator and its result inserted; the base model continues from there.

    python examples/tool_agent.py
"""

from __future__ import annotations

from orchestrator.strategies import answer_of, greedy_graph, tool_graph
from orchestrator.world import world_executor

ex = world_executor()
problems = ["37*49+12", "86*73-15", "58*6+31-40"]
answers = [37 * 49 + 12, 86 * 73 - 15, 58 * 6 + 31 - 40]

greedy = ex.run_many(greedy_graph(), problems)
tools = ex.run_many(tool_graph(), problems)  # the three problems run together, batched
for p, want, g, t in zip(problems, answers, greedy, tools):
    print(f"{p} = {want}")
    print(f"  greedy: {g.text}   {'right' if answer_of(g.state) == want else 'wrong'}")
    print(f"  tools:  {t.text}   {'right' if answer_of(t.state) == want else 'wrong'}")
    for call in t.trace.of("tool"):
        print(f"    calculator({call['input']}) = {call['output']}")

# a tool error never crashes a run: it is inserted as a marker and the model carries on
print("the calculator refuses what is not arithmetic:")
from orchestrator.tools import calculator  # noqa: E402

for expr in ("9**9**9**9", "__import__('os')", "12/0"):
    r = calculator(expr)
    print(f"  [CALC]{expr}[/CALC]{r.insertion}")

print("\ntrace of the first problem:")
tools[0].trace.render()
