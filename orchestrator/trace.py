"""Traces: what a run did, as a list of JSON-able events (also streamed while running).

Events (each has `event`, `run`, `t` = seconds since the executor started):

- `run_start` (graph, prompt, seed) and `run_end` (text, token totals, steps);
- `node`: a node finished on a branch: kind, visit, the adapter it ran (if any), tokens
  (`prefilled` / `reused` from cache / `decoded`), milliseconds from entering to leaving it
  (`ms`, waiting for its batch included), its share of the backend's time (`backend_ms`: each
  batch's time split by tokens computed), and what it produced (`output` text, `score`);
- `adapter`: the branch switched adapter (`from`, `to`);
- `tool`: a tool call (input, output, ok); `score`: a skill's score;
- `fork` (children), `join` (branches, scores, kept), `rewind` (to, retry, tokens dropped).

A trace can be drawn as Mermaid text (the path of the surviving branch, with adapter switches,
tool calls and scores) or as a rich tree in the terminal. `replay_key()` drops the timings, so two
runs with the same seed give equal keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

TIMING = ("t", "ms", "backend_ms")


@dataclass
class Trace:
    graph: str
    events: list[dict] = field(default_factory=list)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps({"graph": self.graph, "events": self.events}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Trace:
        d = json.loads(text)
        return cls(d["graph"], d["events"])

    def replay_key(self) -> list[dict]:
        """The events without their timings."""
        return [{k: v for k, v in e.items() if k not in TIMING} for e in self.events]

    def of(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]

    def totals(self) -> dict:
        """Tokens summed over every node of every branch (work thrown away by joins included)."""
        out = {"prefilled": 0, "reused": 0, "decoded": 0}
        for e in self.of("node"):
            for k in out:
                out[k] += e["tokens"][k]
        return out

    def tokens_by_kind(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for e in self.of("node"):
            d = out.setdefault(e["kind"], {"prefilled": 0, "reused": 0, "decoded": 0, "ms": 0.0, "backend_ms": 0.0,
                                           "calls": 0})
            for k in ("prefilled", "reused", "decoded"):
                d[k] += e["tokens"][k]
            d["ms"] += e["ms"]
            d["backend_ms"] += e.get("backend_ms", 0.0)
            d["calls"] += 1
        return out

    def survivor(self) -> str:
        """Branch id of the branch that ended the run."""
        nodes = self.of("node")
        return nodes[-1]["branch"] if nodes else "0"

    def path(self) -> list[dict]:
        """Events of the surviving branch and its ancestors (and run-wide events), in order."""
        last = self.survivor()
        return [e for e in self.events if "branch" not in e or e["branch"] == last
                or last.startswith(e["branch"] + ".")]

    def mermaid(self) -> str:
        """The surviving branch's path as a Mermaid flowchart."""
        lines, prev, i = ["flowchart LR"], None, 0
        for e in self.path():
            if e["event"] not in ("node", "tool", "rewind", "join", "fork"):
                continue
            i += 1
            label = _label(e).replace('"', "'")
            lines.append(f'  e{i}["{label}"]')
            if prev is not None:
                lines.append(f"  e{prev} --> e{i}")
            prev = i
        return "\n".join(lines)

    def render(self, console=None, title: str | None = None) -> None:
        """A rich tree of the surviving branch's path (needs `rich`)."""
        from rich.console import Console
        from rich.tree import Tree

        console = console if console is not None else Console()
        tree = Tree(title or f"trace of {self.graph}")
        for e in self.path():
            if e["event"] in ("run_start", "run_end"):
                continue
            style = {"adapter": "magenta", "tool": "cyan", "score": "yellow", "rewind": "red",
                     "fork": "blue", "join": "blue"}.get(e["event"], "")
            text = _label(e)
            tree.add(f"[{style}]{_esc(text)}[/{style}]" if style else _esc(text))
        console.print(tree)


def _label(e: dict) -> str:
    ev = e["event"]
    if ev == "node":
        t = e["tokens"]
        who = f", {e['adapter']}" if e.get("adapter") else ""
        work = f": {t['prefilled']} prefilled, {t['reused']} reused, {t['decoded']} decoded" if any(t.values()) else ""
        out = f" -> {e['output']!r}" if e.get("output") else ""
        return f"{e['node']} ({e['kind']}{who}){work}, {e['ms']:.1f} ms{out}"
    if ev == "adapter":
        return f"adapter {e['from']} -> {e['to']}"
    if ev == "tool":
        return f"{e['tool']}({e['input']}) = {e['output']}" + ("" if e["ok"] else " [error]")
    if ev == "score":
        return f"{e['skill']} score {e['value']:.3f}"
    if ev == "fork":
        return f"fork into {len(e['children'])}"
    if ev == "join":
        return f"join: kept {', '.join(e['kept'])} of {len(e['branches'])}"
    if ev == "rewind":
        return f"rewind to {e['to']} (retry {e['retry']}, {e['tokens_dropped']} tokens dropped)"
    return ev


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)
