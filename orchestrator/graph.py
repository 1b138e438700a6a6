"""Agent graphs: nodes and conditional edges over a typed state, held in a networkx DiGraph.

```python
g = Graph(State)
g.add("draft", Generate(stop=["."]))
g.add("check", Score("self_eval"))
g.add("retry", Rewind(to="draft", max_retries=2))
g.edge("draft", "check")
g.edge("check", "retry", when=lambda s: s.score < 0.5)
```

A run walks one *branch* from the start node: each node acts on the branch's state and on its
sequence (the context the model has read), then the first outgoing edge whose `when` holds picks
the next node; no edge means the branch ends. Cycles are fine; the executor's step limit stops a
graph that never leaves one. Node kinds:

- `Generate`: the model (base or an adapter) continues the sequence;
- `Score`: a yes/no skill (verifier, step checker) judges the sequence, on a fork: the sequence
  is unchanged, and an activated skill costs only its invocation tokens (and any evidence it
  reads after them);
- `Ask`: a text skill (tool selector) answers on a fork, into a state field;
- `Tool`: run a call of a named tool (`tools.ToolSpec`) found in a state field and insert the call
  and its result;
- `Append`: put text into the sequence (a separator, an instruction);
- `Call`: plain Python on the state;
- `Fork` / `Join`: split into n branches sharing the prompt's KV cache, and later keep the best
  (best-of-n, beam search); conditional edges are the branches on a condition;
- `Rewind`: backtrack the sequence and the state to where a node was entered, and go there.

Generation-like nodes are generators that yield batches of `GenRequest`s: the executor gathers the
requests of every live branch and runs them in one backend call, so branches share engine steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
from pydantic import BaseModel, ConfigDict

from skills.spec import yes_probability

from .backend import GenRequest

if TYPE_CHECKING:
    from .executor import Ctx

END = "__end__"


class GraphError(RuntimeError):
    """A graph that cannot run: unknown node, step limit reached, a join that can never fire."""


class State(BaseModel):
    """Base class of graph states; subclass it to add fields (pydantic validates every update)."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    prompt: str = ""
    """the user message"""
    history: list[dict[str, str]] = []
    """earlier messages of the conversation ({role, content}), rendered before `prompt` (chat)"""
    text: str = ""
    """the assistant's text so far (kept in step with the sequence by the executor)"""
    last: str = ""
    """the last Generate / Ask / Tool output"""
    score: float | None = None
    """the last Score"""
    finished: bool = False
    """the model ended its answer (end-of-sequence)"""
    retry: int = 0
    """at a node some Rewind targets: how many times the branch was rewound to this point"""


AdapterArg = str | None | Callable[[State], str | None]


class Node:
    """A step of a graph. `run` acts on `ctx` (state, sequence, backend); a node that needs the
    model is a generator that yields batches of requests and receives their results."""

    kind = "node"

    def run(self, ctx: Ctx) -> Iterator[list[GenRequest]] | None:
        return None

    def label(self) -> str:
        return self.kind


@dataclass
class Generate(Node):
    """Continue the sequence with the base (`adapter=None`) or an adapter (a name, or a function
    of the state: the adapter can change per step); the output goes to `state.text` and `into`."""

    adapter: AdapterArg = None
    stop: Sequence[str] = ()
    max_tokens: int = 64
    temperature: float | Callable[[State], float] = 0.0
    top_p: float = 1.0
    into: str = "last"
    kind = "generate"

    def run(self, ctx: Ctx):
        adapter = self.adapter(ctx.state) if callable(self.adapter) else self.adapter
        temperature = self.temperature(ctx.state) if callable(self.temperature) else self.temperature
        ctx.use_adapter(adapter)
        (res,) = yield [GenRequest(ctx.seq, adapter, self.max_tokens, temperature, self.top_p, list(self.stop),
                                   seed=ctx.seed())]
        ctx.count(res.tokens)
        ctx.note(output=res.text, finish=res.finish_reason)
        ctx.state.finished = res.eos
        ctx.put(self.into, res.text)

    def label(self) -> str:
        a = self.adapter if not callable(self.adapter) else "f(state)"
        return f"generate [{a or 'base'}]"


@dataclass
class Score(Node):
    """P(yes) of a yes/no skill after the sequence, into `into`; the sequence is unchanged. The
    skill is a name, or a function of the state (`lambda s: "check-" + s.task`: each branch is
    judged by its own task's verifier). A skill that reads evidence after its invocation gets it
    from `evidence(state)`, or else from the executor's evidence function for the kind the skill
    names (`skill.evidence`; `Executor(evidence={kind: fn})`)."""

    skill: str | Callable[[State], str] = "verifier"
    into: str = "score"
    evidence: Callable[[State], str] | None = None
    kind = "score"

    def __post_init__(self):
        if not callable(self.skill) and not (isinstance(self.skill, str) and self.skill):
            raise TypeError(f"Score: skill must be a skill name or a function of the state, got {self.skill!r}")

    def run(self, ctx: Ctx):
        name = self.skill(ctx.state) if callable(self.skill) else self.skill
        if not isinstance(name, str) or not name:
            raise GraphError(f"node {ctx.br.node!r}: the Score skill function returned {name!r}; "
                             f"it must return a skill name")
        skill = ctx.skill(name)
        evidence = self.evidence(ctx.state) if self.evidence is not None else ctx.evidence(name)
        (f,) = ctx.backend.fork(ctx.seq, 1)
        try:
            ctx.backend.extend(f, skill.suffix + evidence)
            ctx.use_adapter(skill.adapter)
            (res,) = yield [GenRequest(f, skill.adapter, max_tokens=1, temperature=0.0, logprobs=20)]
        finally:
            ctx.backend.close(f)
        ctx.count(res.tokens)
        top = res.top_logprobs[0]  # an answer missing from the top list has probability ~0
        p = yes_probability(top.get(skill.yes, -math.inf), top.get(skill.no, -math.inf))
        ctx.emit("score", skill=name, value=round(p, 6))
        ctx.note(score=round(p, 6))
        ctx.put(self.into, p)

    def label(self) -> str:
        return f"score [{self.skill if not callable(self.skill) else 'f(state)'}]"


@dataclass
class Ask(Node):
    """A text skill's answer after the sequence (on a fork, greedy), into `into`."""

    skill: str = "tool_selector"
    into: str = "last"
    kind = "ask"

    def run(self, ctx: Ctx):
        skill = ctx.skill(self.skill)
        (f,) = ctx.backend.fork(ctx.seq, 1)
        try:
            ctx.backend.extend(f, skill.suffix)
            ctx.use_adapter(skill.adapter)
            (res,) = yield [GenRequest(f, skill.adapter, skill.max_tokens, 0.0, stop=list(skill.stop))]
        finally:
            ctx.backend.close(f)
        ctx.count(res.tokens)
        ctx.note(output=res.text)
        ctx.put(self.into, res.text)

    def label(self) -> str:
        return f"ask [{self.skill}]"


@dataclass
class Tool(Node):
    """If `state.<call>` holds a call of the executor's tool named `tool` (`tools.ToolSpec.find`),
    run it and insert the call and its result (`ToolSpec.insertion`) into the sequence; the
    field `call` is then cleared (unless it is `last`, which gets the inserted text)."""

    tool: str = ""
    call: str = "last"
    kind = "tool"

    def __post_init__(self):
        if not isinstance(self.tool, str) or not self.tool:
            raise TypeError(f"Tool: name the executor's tool to call, e.g. Tool('search'), got {self.tool!r}")

    def run(self, ctx: Ctx):
        tool = ctx.tool(self.tool)
        found = tool.find(getattr(ctx.state, self.call))
        if found is None:
            return
        res = tool.run(found)
        inserted = tool.insertion(found, res)
        ctx.backend.extend(ctx.seq, inserted)
        ctx.emit("tool", tool=self.tool, input=res.input, output=res.output, ok=res.ok,
                 ms=round(res.seconds * 1e3, 3))
        ctx.put("last", inserted)
        if self.call != "last":
            ctx.put(self.call, "")

    def label(self) -> str:
        return f"tool [{self.tool}]"


@dataclass
class Append(Node):
    """Append text (or `text(state)`) to the sequence, as context the model reads."""

    text: str | Callable[[State], str] = ""
    kind = "append"

    def run(self, ctx: Ctx):
        text = self.text(ctx.state) if callable(self.text) else self.text
        if text:
            ctx.backend.extend(ctx.seq, text)

    def label(self) -> str:
        return f"append {self.text!r}" if not callable(self.text) else "append f(state)"


@dataclass
class Call(Node):
    """Plain Python: `fn(state)` may change the state, or return a dict of field updates."""

    fn: Callable[[State], Any] = lambda s: None
    kind = "call"

    def run(self, ctx: Ctx):
        out = self.fn(ctx.state)
        if isinstance(out, dict):
            for k, v in out.items():
                ctx.put(k, v)

    def label(self) -> str:
        return f"call {getattr(self.fn, '__name__', 'fn')}"


@dataclass
class Fork(Node):
    """Split the branch into `n` (an int or a function of the state) copies that share the
    sequence's cache. Copies join the innermost fork group, or the group named `group` if the
    branch is already in it (beam search re-expands its survivors into the same group)."""

    n: int | Callable[[State], int] = 2
    group: str | None = None
    kind = "fork"

    def run(self, ctx: Ctx):
        (res,) = yield [GenRequest(ctx.seq, max_tokens=0)]  # compute the context once, before copying
        ctx.count(res.tokens)

    def label(self) -> str:
        return f"fork x{self.n if not callable(self.n) else 'f(state)'}"


@dataclass
class Join(Node):
    """Wait for every live branch of the innermost fork group, then keep `select(states)` (indices,
    best first; default: the highest `score`). With one survivor the group closes and the survivor
    continues as the original branch; several survivors stay a group (beam search). When
    `done(states)` holds, only the best is kept, the group closes and it goes to `then`."""

    select: Callable[[list[State]], list[int]] = field(default_factory=lambda: top(1))
    done: Callable[[list[State]], bool] | None = None
    then: str | None = None
    """where the survivor goes when `done` closes the group (default: this node's edges)"""
    kind = "join"

    def label(self) -> str:
        return f"join {getattr(self.select, '__name__', '')}".strip()


@dataclass
class Rewind(Node):
    """Backtrack: restore the sequence and the state to where node `to` was last entered, and go
    there; after `max_retries` rewinds to it the branch takes this node's own edges instead."""

    to: str = ""
    max_retries: int = 2
    kind = "rewind"

    def label(self) -> str:
        return f"rewind to {self.to} (≤{self.max_retries})"


def top(k: int = 1, key: str = "score") -> Callable[[list[State]], list[int]]:
    """Selector of the `k` states with the highest `key` (ties: the earlier branch)."""

    def select(states: list[State]) -> list[int]:
        order = sorted(range(len(states)), key=lambda i: (-_num(getattr(states[i], key)), i))
        return order[:k]

    select.__name__ = f"top{k}({key})"
    return select


def weighted_majority(answer: Callable[[State], Any], weight: str | None = "score") -> Callable[[list[State]], list[int]]:
    """Selector: group the states by `answer(state)` (None never wins), sum `weight` per answer
    (1 per state with `weight=None`: plain majority), keep the best-weighted state of the
    heaviest answer (ties: the earlier branch)."""

    def w(s: State) -> float:
        return 1.0 if weight is None else _num(getattr(s, weight))

    def select(states: list[State]) -> list[int]:
        totals: dict[Any, float] = {}
        for s in states:
            a = answer(s)
            if a is not None:
                totals[a] = totals.get(a, 0.0) + w(s)
        if not totals:
            return [0] if weight is None else top(1, weight)(states)
        best = max(totals, key=lambda a: totals[a])  # first seen wins ties
        members = [i for i, s in enumerate(states) if answer(s) == best]
        return [max(members, key=lambda i: (w(states[i]), -i))]

    select.__name__ = f"weighted_majority({weight})" if weight else "majority"
    return select


def _num(x) -> float:
    return float(x) if x is not None else float("-inf")


class Graph:
    """Nodes and conditional edges over a state type; the first node added is the start."""

    def __init__(self, state: type[State] = State, name: str = "graph"):
        if not (isinstance(state, type) and issubclass(state, State)):
            raise TypeError(f"state must be a subclass of orchestrator.State, got {state!r}")
        self.state, self.name = state, name
        self.g = nx.DiGraph()
        self.start: str | None = None

    def add(self, name: str, node: Node) -> Graph:
        if not isinstance(name, str) or not name or name == END:
            raise ValueError(f"node name must be a non-empty string other than {END!r}, got {name!r}")
        if "node" in self.g.nodes.get(name, {}):
            raise ValueError(f"node {name!r} already exists")
        if not isinstance(node, Node):
            raise TypeError(f"node {name!r} must be a Node (Generate, Score, ...), got {type(node).__name__}")
        self.g.add_node(name, node=node)
        self.start = self.start or name
        return self

    def edge(self, src: str, dst: str, when: Callable[[State], bool] | None = None) -> Graph:
        """Go from `src` to `dst` (or END) when `when(state)` holds (always, without `when`);
        edges are tried in the order they were added. Nodes may be added after their edges."""
        for n in (src, dst):
            if not isinstance(n, str) or not n:
                raise ValueError(f"edge {src!r} -> {dst!r}: node names are non-empty strings")
        if src == END:
            raise ValueError(f"no edge can leave {END!r}")
        if when is not None and not callable(when):
            raise TypeError(f"edge {src!r} -> {dst!r}: when must be a function of the state, got {when!r}")
        order = len(self.g.out_edges(src)) if src in self.g else 0
        if self.g.has_edge(src, dst):
            raise ValueError(f"edge {src!r} -> {dst!r} exists already")
        self.g.add_edge(src, dst, when=when, order=order)
        return self

    def chain(self, *names: str) -> Graph:
        """Unconditional edges through `names` in order."""
        for a, b in zip(names, names[1:]):
            self.edge(a, b)
        return self

    def node(self, name: str) -> Node:
        if "node" not in self.g.nodes.get(name, {}):
            raise GraphError(f"graph {self.name!r} has no node {name!r}")
        return self.g.nodes[name]["node"]

    def next(self, name: str, state: State) -> str:
        for _, dst, d in sorted(self.g.out_edges(name, data=True), key=lambda e: e[2]["order"]):
            if d["when"] is None or d["when"](state):
                return dst
        return END

    def validate(self) -> None:
        if self.start is None:
            raise GraphError(f"graph {self.name!r} has no nodes")
        for name, d in self.g.nodes(data=True):
            if "node" not in d and name != END:
                used = [f"{a!r} -> {b!r}" for a, b in self.g.edges if name in (a, b)]
                raise GraphError(f"graph {self.name!r}: edge {used[0]} names {name!r}, which is not a node")
        for name, d in self.g.nodes(data=True):
            if name == END:
                continue
            node = d["node"]
            if isinstance(node, Join) and node.then is not None and node.then != END and node.then not in self.g:
                raise GraphError(f"join {name!r} sends its survivor to {node.then!r}, which is not a node")
            if isinstance(node, Rewind) and node.to not in self.g:
                raise GraphError(f"node {name!r} rewinds to {node.to!r}, which is not a node")
            if isinstance(node, Rewind) and node.to not in nx.ancestors(self.g, name):
                raise GraphError(f"node {name!r} rewinds to {node.to!r}, which never runs before it")

    def mermaid(self) -> str:
        """The graph as Mermaid flowchart text."""
        lines = ["flowchart TD"]
        for name, d in self.g.nodes(data=True):
            if name != END:
                lines.append(f'  {_mid(name)}["{name}: {d["node"].label()}"]')
        for src, dst, d in self.g.edges(data=True):
            cond = d["when"]
            cname = getattr(cond, "__name__", "when")
            lab = f"|{cname if cname != '<lambda>' else 'when'}|" if cond is not None else ""
            lines.append(f"  {_mid(src)} -->{lab} {_mid(dst) if dst != END else 'END((end))'}")
        for name, d in self.g.nodes(data=True):
            if isinstance(d.get("node"), Rewind):
                lines.append(f"  {_mid(name)} -.->|rewind| {_mid(d['node'].to)}")
        return "\n".join(lines)


def _mid(name: str) -> str:
    return "n_" + re.sub(r"\W", "_", name)
