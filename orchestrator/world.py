"""The default world's wiring: what the generic orchestrator needs to run a kilolora world.

The core (`graph`, `executor`, `backend`, `tools`) knows no world; this module is the one place
that does, on top of it:

- the calculator as a tool in the world's markup (`[CALC]37*49[/CALC]=1813`: `CALCULATOR`);
- the evidence the world's verifier and step checker read after their invocation (their skill
  specs say `evidence="calculator"`): the calculator's verdict on every claim `a op b = c` of
  the text (`calculator_evidence`, the run-time side of `skills.data.evidence`);
- factories that serve a world (`skills.world.World`; default: the embedded one) with its skills,
  tools and evidence: in-process (`world_backend`, `world_executor`) or against `kilolora serve`
  (`world_executor(backend=HttpBackend(url))`, `world_chat(url=...)`), and the server's tool-call
  format for it (`world_tool_format`, used by `kilolora serve`).

```python
from orchestrator.world import world_executor
ex = world_executor()    # the embedded world, in-process
```

With your own model and tools, skip this module: `Executor(EngineBackend(engine), skills,
tools=[MarkupTool(...)], evidence={...})`.
"""

from __future__ import annotations

from skills.tasks import claims
from skills.tokenizer import CALC_CLOSE, CALC_OPEN

from .backend import Backend, EngineBackend
from .executor import Ctx, Executor
from .tools import MarkupTool, calculator

CALCULATOR = MarkupTool("calculator", calculator, CALC_OPEN, CALC_CLOSE)
"""the safe calculator, called as `[CALC]expr[/CALC]` (the result goes after it: `=1813`)"""


def calculator_evidence(ctx: Ctx) -> str:
    """Run the calculator on every claim `a op b = c` of the branch's text; the verdicts a
    calculator-checked skill reads (`skills.data.evidence`: `xv` = the first claim is wrong, the
    second right). The checks are one `tool` event (`purpose="evidence"`) in the trace."""
    from skills.data import evidence  # imports torch (training helpers): only when a skill reads it

    found = claims(ctx.state.text)
    results = [calculator(expr) for expr, _ in found]
    if found:
        ctx.emit("tool", tool=CALCULATOR.name, purpose="evidence", input="; ".join(e for e, _ in found),
                 output="; ".join(r.output for r in results), ok=all(r.ok for r in results),
                 ms=round(sum(r.seconds for r in results) * 1e3, 3))
    return evidence([(e, claimed, r.output if r.ok else "error") for (e, claimed), r in zip(found, results)])


TOOLS = (CALCULATOR,)
"""the world's tools"""
EVIDENCE = {"calculator": calculator_evidence}
"""the world's evidence functions, by the kind a skill spec names (`Skill.evidence`)"""


def _load(world):
    from skills.world import World

    return world if world is not None else World.load()


def world_backend(world=None, **engine_kw) -> EngineBackend:
    """The embedded default world (or `world`) served in-process; `engine_kw` go to
    `World.engine` (e.g. `uncompressed=True`)."""
    engine_kw.setdefault("kv_cache_tokens", 1 << 17)
    return EngineBackend(_load(world).engine(**engine_kw))


def world_executor(world=None, backend: Backend | None = None, **kw) -> Executor:
    """An executor with a world's skills, tools and evidence, on its in-process engine unless
    `backend` is given (e.g. `HttpBackend(url)` against `kilolora serve` on the same world);
    `kw` go to `Executor`."""
    world = _load(world)
    backend = backend if backend is not None else world_backend(world)
    return Executor(backend, {s.name: s for s in world.skills()}, tools=TOOLS, evidence=EVIDENCE, **kw)


def world_tool_format(world=None):
    """The world's OpenAI tool-call format for `kilolora serve`: `calculator(expression)` written
    as `[CALC]expr[/CALC]`, proposed at step boundaries by the world's tool-selector skill."""
    from serving.openai.tool_formats import MarkupTools

    selectors = _load(world).skills("tool_selector")
    if not selectors:
        return MarkupTools(function=CALCULATOR.name, open=CALC_OPEN, close=CALC_CLOSE)
    s = selectors[0]
    # a result ends its step (`[CALC]37*49[/CALC]=1813. `): the answer goes on with the next step
    return MarkupTools(function=CALCULATOR.name, open=CALC_OPEN, close=CALC_CLOSE, proposer=s.adapter,
                       invocation=s.invocation or "", max_call_tokens=s.max_tokens, result_suffix=". ")


def world_chat(world=None, url: str | None = None, **kw):
    """A `chat.ChatSession` in-process on the world's engine, or against the server at `url`
    serving that world; `kw` go to `ChatSession`."""
    from .chat import ChatSession

    world = _load(world)
    skills = {s.name: s for s in world.skills()}
    if url is None:
        backend = world_backend(world)
        adapters = backend.engine.adapters
    else:
        from .http_backend import HttpBackend, ServerError

        backend = HttpBackend(url)
        try:
            adapters = backend.models()
        except ServerError as err:
            raise ValueError(str(err)) from None
        missing = [s.adapter for s in skills.values() if s.role != "task" and s.adapter not in adapters]
        if missing:
            raise ValueError(f"the server at {url} does not serve the world's skills {missing}; start it with "
                             f"`kilolora serve` on the same world")
    return ChatSession(backend, skills, adapters, toolbox=TOOLS, evidence=EVIDENCE, **kw)
