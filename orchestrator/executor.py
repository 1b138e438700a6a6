"""The executor: runs graphs on a backend, every live branch of every run advanced together.

Each round, every branch runs its node until the node asks the backend for generation; the
requests of all branches (of all runs given to `run_many`) go to the backend in one call, so
branches and problems share engine steps. Forks share the sequence's KV blocks; joins wait for
their group; rewinds restore the sequence and the state recorded when a node was entered. The
executor holds only its configuration; a `run_many` call's queue, branches and traces live in its
own `_Runs`, so calls may nest or repeat and leave nothing behind.

Seeds: every request's seed is a function of the run's seed, the branch's path (fork child
indices), the node and how many times the branch entered it, so the same seed replays the same
run, whatever else shares the batch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend, GenRequest, GenResult, Tokens
from .graph import END, Fork, Graph, GraphError, Join, Rewind, State
from .tools import ToolSpec
from .trace import Trace


@dataclass
class Branch:
    run: int
    id: str
    """the fork path, e.g. `0.2.1`"""
    seq: int
    state: State
    node: str
    adapter: str | None = None
    steps: int = 0
    visits: dict[str, int] = field(default_factory=dict)
    marks: dict[str, tuple[int, dict]] = field(default_factory=dict)
    """node -> (sequence mark, state snapshot) when last entered"""
    retries: dict[tuple[str, int], int] = field(default_factory=dict)
    groups: list[tuple[str, int]] = field(default_factory=list)
    """fork groups it belongs to, innermost last: (group name, group id)"""
    gen: Any = None
    pending: list[GenRequest] | None = None
    tokens: Tokens = field(default_factory=Tokens)
    node_tokens: Tokens = field(default_factory=Tokens)
    node_t0: float = 0.0
    children: int = 0
    done: bool = False
    prompt_mark: int = 0
    """where the assistant's text starts in the sequence"""
    node_seeds: int = 0
    node_adapter: str | None = None
    """the adapter the current node ran a model with (None: it ran none)"""
    node_backend_ms: float = 0.0
    """the current node's share of the backend calls' time"""
    node_info: dict = field(default_factory=dict)
    """what the current node adds to its trace event (e.g. its output text)"""


@dataclass
class Run:
    """The result of one run: the final state, its trace and the sequence's text."""

    state: State
    trace: Trace
    text: str


class Ctx:
    """What a node sees: the branch's state and sequence, the backend, skills, tools and evidence."""

    def __init__(self, runs: _Runs, br: Branch):
        self.runs, self.br = runs, br
        self.ex = runs.ex
        self.backend = runs.ex.backend

    @property
    def state(self) -> State:
        return self.br.state

    @property
    def seq(self) -> int:
        return self.br.seq

    def skill(self, name: str):
        if name not in self.ex.skills:
            raise GraphError(f"no skill {name!r}; this executor knows {sorted(self.ex.skills)}")
        return self.ex.skills[name]

    def tool(self, name: str) -> ToolSpec:
        if name not in self.ex.tools:
            raise GraphError(f"no tool {name!r}; this executor knows {sorted(self.ex.tools)}")
        return self.ex.tools[name]

    def evidence(self, skill: str) -> str:
        """What skill `skill` reads after its invocation: the executor's evidence function for the
        kind it names (`skill.evidence`), or nothing if it names none."""
        kind = getattr(self.skill(skill), "evidence", None)
        if not kind:
            return ""
        if kind not in self.ex.evidence:
            raise GraphError(f"skill {skill!r} reads {kind!r} evidence, and this executor has no function for it "
                             f"(it has {sorted(self.ex.evidence)}); pass evidence={{{kind!r}: fn}} to Executor")
        return self.ex.evidence[kind](self)

    def seed(self) -> int:
        br = self.br
        br.node_seeds += 1
        key = f"{self.runs.seeds[br.run]}|{br.id}|{br.node}|{br.visits[br.node]}|{br.node_seeds}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 2

    def count(self, tokens: Tokens) -> None:
        self.br.node_tokens = self.br.node_tokens + tokens

    def use_adapter(self, adapter: str | None) -> None:
        self.br.node_adapter = adapter or "base"
        if adapter != self.br.adapter:
            self.emit("adapter", **{"from": self.br.adapter or "base", "to": adapter or "base"})
            self.br.adapter = adapter

    def note(self, **info) -> None:
        """Add fields to this node's trace event."""
        self.br.node_info.update(info)

    def put(self, name: str, value) -> None:
        if name not in type(self.state).model_fields:
            raise GraphError(f"node {self.br.node!r} writes {name!r}, which {type(self.state).__name__} has no field for")
        setattr(self.state, name, value)

    def emit(self, event: str, **data) -> None:
        self.runs.emit(self.br.run, event, branch=self.br.id, node=self.br.node, **data)


Evidence = Callable[[Ctx], str]
"""what a skill reads after its invocation, computed for a node's branch (it may run tools and
emit their events); `Executor(evidence={kind: fn})` serves skills whose `evidence` is `kind`"""


class Executor:
    """Runs graphs on a backend with the given skills (name -> `skills.spec.Skill`), tools
    (`tools.ToolSpec`s, or name -> ToolSpec) and evidence functions (kind -> `Evidence`). It
    holds only this configuration: each `run_many` call keeps its state in its own `_Runs`, so
    calls may repeat or nest (a `Call` node's function may run another graph)."""

    def __init__(self, backend: Backend, skills: dict | None = None,
                 tools: Iterable[ToolSpec] | Mapping[str, ToolSpec] | None = None, max_steps: int = 200,
                 on_event: Callable[[dict], None] | None = None, max_runs: int = 64,
                 on_text: Callable[[dict], None] | None = None, evidence: Mapping[str, Evidence] | None = None):
        self.backend = backend
        self.skills = dict(skills) if skills is not None else {}
        self.tools = _tool_map(tools)
        self.evidence = dict(evidence) if evidence is not None else {}
        bad = [k for k, fn in self.evidence.items() if not callable(fn)]
        if bad:
            raise TypeError(f"evidence must map a kind to a function of the node context; {bad[0]!r} maps to "
                            f"{self.evidence[bad[0]]!r}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if not isinstance(max_runs, int) or max_runs < 1:
            raise ValueError(f"max_runs must be an integer >= 1, got {max_runs!r}")
        self.max_steps = max_steps
        self.max_runs = max_runs
        """runs of `run_many` live at once; the others queue (each holds its branches' KV cache)"""
        self.on_event = on_event
        self.on_text = on_text
        """streamed model output: {run, branch, node, adapter, text} per piece (not kept in traces)"""

    def run(self, graph: Graph, prompt: str | State, seed: int = 0) -> Run:
        return self.run_many(graph, [prompt], seed=seed)[0]

    def run_many(self, graph: Graph, prompts: Sequence[str | State], seed: int = 0) -> list[Run]:
        """Run `graph` once per prompt (a user message, or an initial state whose `prompt` is the
        message), all together; run i is seeded with `seed + i`."""
        graph.validate()
        states = [p.model_copy(deep=True) if isinstance(p, State) else graph.state(prompt=p) for p in prompts]
        for st in states:
            if not isinstance(st, graph.state):
                raise TypeError(f"initial state must be a {graph.state.__name__}, got {type(st).__name__}")
        return _Runs(self, graph, states, seed).execute()


def _tool_map(tools: Iterable[ToolSpec] | Mapping[str, ToolSpec] | None) -> dict[str, ToolSpec]:
    if tools is None:
        return {}
    items = list(tools.items()) if isinstance(tools, Mapping) else [(getattr(t, "name", None), t) for t in tools]
    for name, t in items:
        if not isinstance(t, ToolSpec):
            raise TypeError(f"tool {name!r} must be a tools.ToolSpec (name, find, run, insertion), got {t!r}; "
                            f"wrap a function of one string as tools.MarkupTool(name, fn, open, close)")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool names must be non-empty strings, got {name!r}")
    return dict(items)


class _Runs:
    """The state of one `run_many` call: its graph, queue, live branches, traces and seeds."""

    def __init__(self, ex: Executor, graph: Graph, states: list[State], seed: int):
        self.ex = ex
        self.backend = ex.backend
        self.graph = graph
        self.rewind_targets = {n.to for _, n in graph.g.nodes(data="node") if isinstance(n, Rewind)}
        """nodes some Rewind goes back to (their entry sets `state.retry`)"""
        self.t0 = time.perf_counter()
        self.traces = [Trace(graph.name) for _ in states]
        self.seeds = [seed + i for i in range(len(states))]
        self.queue: list[tuple[int, State]] = list(enumerate(states))
        """runs not started yet (at most `max_runs` are live)"""
        self.active: set[int] = set()
        """runs started and not ended"""
        self.branches: list[Branch] = []
        """live branches of every run"""
        self.finished: list[list[Branch]] = [[] for _ in states]
        """per run, the branches that reached the end outside any fork group"""
        self.group_ids = 0

    def execute(self) -> list[Run]:
        try:
            self._loop()
        finally:
            for br in self.branches:
                self.backend.close(br.seq)
        runs = []
        for i, done in enumerate(self.finished):
            if len(done) != 1:
                raise GraphError(f"run {i} ended with {len(done)} branches; a graph with Fork needs a Join "
                                 f"before its end")
            br = done[0]
            self.emit(i, "run_end", text=br.state.text, tokens=br.tokens.as_dict(), steps=br.steps)
            runs.append(Run(br.state, self.traces[i], br.state.text))
        return runs

    def emit(self, run: int, event: str, **data) -> None:
        ev = {"event": event, "run": run, **data, "t": round(time.perf_counter() - self.t0, 6)}
        self.traces[run].events.append(ev)
        if self.ex.on_event is not None:
            self.ex.on_event(ev)

    # ------------------------------------------------------------------ the loop
    def _admit(self) -> None:
        """Start queued runs while fewer than `max_runs` are live (bounds the KV cache in use)."""
        while self.queue and len(self.active) < self.ex.max_runs:
            i, state = self.queue.pop(0)
            msgs = [*state.history, {"role": "user", "content": state.prompt}] if state.history else state.prompt
            seq = self.backend.open(self.backend.chat_prompt(msgs))
            self.emit(i, "run_start", graph=self.graph.name, prompt=state.prompt, seed=self.seeds[i])
            br = Branch(i, "0", seq, state, "", prompt_mark=self.backend.mark(seq))
            self.branches.append(br)
            self.active.add(i)
            self._enter(br, self.graph.start)

    def _loop(self) -> None:
        while True:
            self._admit()
            if not self.branches:
                return
            moved = True
            while moved:  # until every branch waits for the backend, waits at a join, or has ended
                ready = [b for b in self.branches if not b.done and b.pending is None and not self._at_join(b)]
                for br in ready:
                    self._advance(br, None)
                moved = bool(ready) | self._resolve_joins()
            waiting = [b for b in self.branches if not b.done and b.pending]
            if not waiting:
                stuck = [f"run {b.run} branch {b.id} at {b.node!r}" for b in self.branches if not b.done]
                if stuck:
                    raise GraphError(f"branches wait at joins that can never fire: {stuck[:5]}")
                continue  # every live run ended this round: admit queued ones, or stop
            reqs = [r for b in waiting for r in b.pending]
            t = time.perf_counter()
            results = self.backend.generate(reqs, self._streamer(waiting)) if self.ex.on_text is not None \
                else self.backend.generate(reqs)
            # the round's backend time, shared out by tokens computed (exact for a round of one kind)
            ms = (time.perf_counter() - t) * 1e3
            work = [max(r.tokens.computed, 1) for r in results]
            total = sum(work)
            k = 0
            for b in waiting:
                n = len(b.pending)
                b.pending = None
                b.node_backend_ms += ms * sum(work[k:k + n]) / total
                self._advance(b, results[k:k + n])
                k += n

    def _streamer(self, waiting: list[Branch]) -> Callable[[int, str], None]:
        owners = [(b, r) for b in waiting for r in b.pending]

        def stream(i: int, text: str) -> None:
            b, r = owners[i]
            self.ex.on_text({"run": b.run, "branch": b.id, "node": b.node, "kind": self.graph.node(b.node).kind,
                     "adapter": r.adapter or "base", "text": text})

        return stream
    def _at_join(self, br: Branch) -> bool:
        return br.gen is None and isinstance(self.graph.node(br.node), Join)

    def _advance(self, br: Branch, results: list[GenResult] | None) -> None:
        """Run the branch until it needs the backend, waits at a join, or ends."""
        while not br.done and br.pending is None:
            node = self.graph.node(br.node)
            if isinstance(node, Join):
                br.pending = None
                return  # joins are resolved when their whole group waits
            if br.gen is None:
                return self._rewind(br, node)
            sent, results = results, None
            try:
                reqs = br.gen.send(sent) if sent is not None else next(br.gen)
                if not reqs:
                    raise GraphError(f"node {br.node!r} yielded an empty request batch")
                br.pending = list(reqs)
                return
            except StopIteration:
                br.gen = None
                if isinstance(node, Fork):
                    self._fork(br, node)
                else:
                    self._leave(br)

    def _enter(self, br: Branch, name: str) -> None:
        if name == END:
            br.done = True
            self._finish(br)
            return
        br.steps += 1
        if br.steps > self.ex.max_steps:
            raise GraphError(f"run {br.run}: step limit {self.ex.max_steps} reached at node {name!r} (branch {br.id}); "
                             f"a cycle with no exit? add a condition or raise max_steps")
        br.node = name
        br.visits[name] = br.visits.get(name, 0) + 1
        br.node_seeds = 0
        mark = self.backend.mark(br.seq)
        if name in self.rewind_targets:
            br.state.retry = br.retries.get((name, mark), 0)
        br.marks[name] = (mark, br.state.model_dump())
        br.node_tokens, br.node_t0 = Tokens(), time.perf_counter()
        node = self.graph.node(name)
        if not isinstance(node, (Join, Rewind)):
            gen = node.run(Ctx(self, br))  # a plain function's work is done here; a generator's starts on next()
            br.gen = gen if gen is not None else iter(())

    def _leave(self, br: Branch) -> None:
        br.state.text = self.backend.text(br.seq, br.prompt_mark)
        self._emit_node(br)
        self._enter(br, self.graph.next(br.node, br.state))

    def _emit_node(self, br: Branch) -> None:
        br.tokens = br.tokens + br.node_tokens
        self.emit(br.run, "node", branch=br.id, node=br.node, kind=self.graph.node(br.node).kind,
                  visit=br.visits[br.node], adapter=br.node_adapter, tokens=br.node_tokens.as_dict(),
                  ms=round((time.perf_counter() - br.node_t0) * 1e3, 3), backend_ms=round(br.node_backend_ms, 3),
                  **br.node_info)
        br.node_tokens, br.node_adapter, br.node_info, br.node_backend_ms = Tokens(), None, {}, 0.0

    def _finish(self, br: Branch) -> None:
        """The branch reached the end: free its sequence (its text is in its state)."""
        self.branches.remove(br)
        self.backend.close(br.seq)
        if br.groups:
            return  # ended inside a fork group: the group's join no longer waits for it
        self.finished[br.run].append(br)
        self.active.discard(br.run)

    # ------------------------------------------------------------- control nodes
    def _fork(self, br: Branch, node: Fork) -> None:
        """After the Fork node computed the context: split the branch into n copies."""
        n = node.n(br.state) if callable(node.n) else node.n
        if not isinstance(n, int) or n < 1:
            raise GraphError(f"fork {br.node!r} asked for {n!r} branches; need an integer >= 1")
        if not (br.groups and node.group is not None and br.groups[-1][0] == node.group):
            self.group_ids += 1
            br.groups = br.groups + [(node.group or br.node, self.group_ids)]
        self._emit_node(br)
        kids = []
        for s in self.backend.fork(br.seq, n):
            br.children += 1
            kids.append(Branch(br.run, f"{br.id}.{br.children - 1}", s, br.state.model_copy(deep=True), br.node,
                               br.adapter, br.steps, dict(br.visits), dict(br.marks), dict(br.retries),
                               list(br.groups), tokens=br.tokens, prompt_mark=br.prompt_mark))
        self.emit(br.run, "fork", branch=br.id, node=br.node, children=[k.id for k in kids])
        self.backend.close(br.seq)
        br.done = True
        self.branches.remove(br)
        self.branches.extend(kids)
        for k in kids:
            self._enter(k, self.graph.next(k.node, k.state))

    def _rewind(self, br: Branch, node: Rewind) -> None:
        mark, snap = br.marks[node.to]
        used = br.retries.get((node.to, mark), 0)  # counted per position: each new step gets its own
        if used >= node.max_retries:
            return self._leave(br)
        br.retries[(node.to, mark)] = used + 1
        dropped = self.backend.mark(br.seq) - mark
        self.backend.rewind(br.seq, mark)
        br.state = type(br.state).model_validate(snap)
        self.emit(br.run, "rewind", branch=br.id, node=br.node, to=node.to, retry=used + 1, tokens_dropped=dropped)
        self._emit_node(br)
        self._enter(br, node.to)

    def _resolve_joins(self) -> bool:
        """Fire every join whose group has all its live members waiting at it."""
        fired = False
        at_join = [b for b in self.branches if not b.done and isinstance(self.graph.node(b.node), Join)]
        by_group: dict[tuple[int, tuple], list[Branch]] = {}
        for b in at_join:
            if not b.groups:
                raise GraphError(f"branch {b.id} reached join {b.node!r} without a fork before it")
            by_group.setdefault((b.run, b.groups[-1]), []).append(b)
        for (run, group), members in by_group.items():
            live = [b for b in self.branches if not b.done and b.run == run and b.groups and b.groups[-1] == group]
            if len(live) != len(members) or len({b.node for b in members}) != 1:
                continue
            members.sort(key=lambda b: _path(b.id))
            node: Join = self.graph.node(members[0].node)
            states = [b.state for b in members]
            closing = node.done is not None and node.done(states)
            keep = node.select(states)
            if not keep or any(not 0 <= i < len(members) for i in keep):
                raise GraphError(f"join {members[0].node!r}: select returned {keep!r} for {len(members)} branches")
            keep = keep[:1] if closing else keep
            self.emit(run, "join", node=members[0].node, branches=[b.id for b in members],
                      scores=[s.score for s in states], kept=[members[i].id for i in keep])
            for i, b in enumerate(members):
                if i not in keep:
                    b.done = True
                    self.backend.close(b.seq)
                    self.branches.remove(b)
            for i in keep:
                b = members[i]
                if len(keep) == 1:
                    b.groups = b.groups[:-1]
                if closing and node.then is not None:
                    b.state.text = self.backend.text(b.seq, b.prompt_mark)
                    self._emit_node(b)
                    self._enter(b, node.then)
                else:
                    self._leave(b)
            fired = True
        return fired


def _path(branch_id: str) -> tuple[int, ...]:
    return tuple(int(x) for x in branch_id.split("."))
