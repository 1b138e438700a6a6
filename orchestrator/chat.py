"""A chat session over any backend: each turn first reads what the message is, then runs only the
skills that fit it, and keeps the conversation. The terminal UI is `cli/chat.py`; this module has
no terminal code, so it is driven the same way in tests and in other front ends.

- an arithmetic problem of the world's form (`b*c±a`, skills/tasks.py), bare or wrapped in words
  ("What is 58*63-17?", "58 * 63 - 17 = ?"): `strategies.chat_graph` with the tool selector, the
  calculator and the verifier, on the problem as the world was trained on it (`58*63-17`);
- a transformation of the world (`shift 3: hello`, `add 2: 123`, `replace e a: hello`): the task
  adapter that performs it answers the operation alone (`shift: hello`, as it was trained), else
  the base answers the instruction; its per-task verifier (`check-<task>`) scores it where the
  world has one; never the calculator or the arithmetic verifier, which judge arithmetic only;
- anything else: the base (or the user's `/adapter`) alone.

Each turn's `Route` says which, and why, in one line (`note`), before the answer is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from skills.tasks import TEMPLATES, Transform

from .backend import Backend
from .executor import Evidence, Executor, Run
from .strategies import chat_graph
from .tools import ToolSpec

# ------------------------------------------------------------------------------ reading messages

_OPS = {"*": r"\s*[*×xX·]\s*", "+": r"\s*\+\s*", "-": r"\s*[-−–]\s*"}
_WORDS = ((re.compile(r"\b(?:times|multiplied by)\b", re.I), "*"), (re.compile(r"\bplus\b", re.I), "+"),
          (re.compile(r"\bminus\b", re.I), "-"))


def _template_re(template: str) -> re.Pattern:
    """`{b}*{c}+{a}` -> a pattern for it with spaces and `× − x` allowed, not inside a longer expression."""
    body = "".join(rf"(?P<{p[1]}>\d+)" if p.startswith("{") else "".join(_OPS[ch] for ch in p)
                   for p in re.split(r"(\{\w\})", template) if p)
    return re.compile(r"(?<![\w.\-−–])" + body + r"(?!\w|\.\d|\s*[-−–+*×·/^]\s*\d)")


_PROBLEMS = [(t, _template_re(t)) for t in sorted(TEMPLATES, key=len, reverse=True)]


def read_problem(message: str) -> str | None:
    """The arithmetic problem of the world's form in `message`, written as the world was trained
    on it (`What is 58 * 63 - 17?` -> `58*63-17`), or None. The rest of the message may be words
    and punctuation but no other number, which would make the question another one."""
    text = message
    for pattern, op in _WORDS:
        text = pattern.sub(op, text)
    for template, pattern in _PROBLEMS:
        m = pattern.search(text)
        if m and not re.search(r"\d", text[:m.start()] + text[m.end():]):
            return template.format(**{k: int(v) for k, v in m.groupdict().items()})
    return None


_TRANSFORM_RE = re.compile(
    r"^\s*(?P<family>shift|add|replace)(?:\s+|-)"
    r"(?P<arg>\d+|[a-z]\s*(?:->|→|\s+with\s+|\s)\s*[a-z]|[a-z][a-z])\s*:\s*(?P<x>\S.*?)\s*$", re.I)


def read_transform(message: str) -> tuple[Transform, str] | None:
    """The world transformation `message` asks for and its input (`shift 3: hello`, `shift-3:
    hello`, `replace e a: hello`, `replace e with a: hello`), or None."""
    m = _TRANSFORM_RE.match(message)
    if not m:
        return None
    family, arg = m.group("family").lower(), m.group("arg").lower()
    if family in ("shift", "add"):
        if not arg.isdigit():
            return None
        arg = str(int(arg))
    else:
        letters = re.sub(r"->|→|with|\s", "", arg)
        if len(letters) != 2 or not letters.isalpha():
            return None
        arg = f"{letters[0]} {letters[1]}"
    return Transform(family, arg), m.group("x")


def _not_a_task(message: str) -> str:
    """Why a message is neither, with the form it may have missed."""
    if re.match(r"^\s*(shift|add|replace)\s*:", message, re.I):
        return "a transformation needs its parameter (e.g. 'shift 3: hello')"
    if re.search(r"\d\s*[-−–+*×/^]\s*\d", message):
        return "not an arithmetic problem of this world's form b*c±a (e.g. 37*49+12)"
    return "not arithmetic or a transformation of this world"


@dataclass(frozen=True)
class Route:
    """How one message is answered: what it was read as, what the model is given, which skills run."""

    kind: Literal["arithmetic", "transform", "other"]
    prompt: str
    """the user message the model is given (a normalised problem, a task prompt, or the message)"""
    adapter: str | None
    """the adapter that writes the answer (None: the base)"""
    tools: bool
    """the tool selector proposes calculator calls before each step"""
    verifier: str | None
    """the skill that scores the answer (`verifier` for arithmetic, `check-<task>` for a task)"""
    note: str
    """one line for the user: what the message was read as and what runs on it"""
    task: str | None = None
    """a transformation's instruction, e.g. `shift 3`"""

    def event(self) -> dict:
        return {"event": "route", "kind": self.kind, "prompt": self.prompt, "adapter": self.adapter,
                "tools": self.tools, "verifier": self.verifier, "task": self.task, "note": self.note}


class ChatSession:
    """Turns of a conversation on `backend` with a world's skills (see the module docstring); its
    executor runs them with `toolbox` (the calculator) and `evidence` (what the verifier reads).
    A world's session: `orchestrator.world.world_chat`."""

    def __init__(self, backend: Backend, skills: dict, adapters: list[str], *, tools: bool = True,
                 verify: bool = True, seed: int = 0, turns: int | None = None, on_event: Callable[[dict], None] | None = None,
                 on_text: Callable[[dict], None] | None = None, toolbox: Sequence[ToolSpec] = (),
                 evidence: Mapping[str, Evidence] | None = None):
        self.backend = backend
        self.skills = skills
        self.available = set(adapters)
        """adapters the backend serves (for `/adapter`)"""
        self.tools = tools and "tool_selector" in skills
        self.verify = verify and "verifier" in skills
        self.adapter: str | None = None
        self.history: list[dict[str, str]] = []
        self.turns_seen = turns
        """earlier turns the model sees with each message (None: all)"""
        self.last: Run | None = None
        self.seed = seed
        self.turns = 0
        self.route: Route | None = None
        """how the last message was read and answered"""
        self.on_event = on_event
        self.executor = Executor(backend, skills, tools=toolbox, on_event=on_event, on_text=on_text,
                                 evidence=evidence)
        served = [s for s in skills.values() if s.task and s.adapter in self.available]
        self.task_adapters = {s.task: s.adapter for s in served if s.role == "task"}
        """transformation instruction (`shift 3`) -> the task adapter that performs it"""
        self.task_checkers = {s.task: s.name for s in served if s.role == "verifier"}
        """transformation instruction -> its per-task verifier skill (`check-<task>`)"""

    def set_adapter(self, name: str) -> None:
        """The adapter that writes the answer from the next turn on (`base` for the base model)."""
        if name in ("base", "", None):
            self.adapter = None
            return
        if name not in self.available:
            near = sorted(a for a in self.available if name.split("-")[0] in a)[:8]
            raise ValueError(f"no adapter {name!r} is served" + (f"; did you mean one of {near}?" if near else ""))
        self.adapter = name

    def reset(self) -> None:
        self.history.clear()
        self.last = self.route = None

    def read(self, message: str) -> Route:
        """What `message` is and how this session answers it (see the module docstring)."""
        mine = self.adapter
        problem = read_problem(message)
        if problem is not None:
            skills = [n for n, on in (("tool selector + calculator", self.tools), ("verifier", self.verify)) if on]
            by = f"; adapter {mine} writes the steps" if mine else ""
            note = (f"reading this as the arithmetic problem {problem}" if problem != message.strip()
                    else f"arithmetic problem {problem}") + (f": {', '.join(skills)}" if skills else "") + by
            return Route("arithmetic", problem, mine, self.tools, "verifier" if self.verify else None, note)
        found = read_transform(message)
        if found is not None:
            t, x = found
            own = self.task_adapters.get(t.instruction)
            adapter = mine if mine is not None else own
            # a task adapter was trained on the operation alone; anything else reads the instruction
            prompt = t.prompt(x) if adapter is not None and adapter == own else f"{t.instruction}: {x}"
            # its checker was trained on the task adapter's prompt and answers, so it judges only those
            checker = self.task_checkers.get(t.instruction) if self.verify and own is not None and adapter == own \
                else None
            if mine is not None:
                who = f"your adapter {mine} answers {prompt!r}" + (
                    f" (the world's adapter for it is {own})" if own not in (None, mine) else "")
            elif own is not None:
                who = f"adapter {own} answers {prompt!r}"
            else:
                who = f"no adapter performs it, so the base answers {prompt!r}"
            note = (f"{t.instruction}: {who}" + (f", {checker} scores it" if checker else "")
                    + "; not arithmetic: no calculator, no arithmetic verifier")
            return Route("transform", prompt, adapter, False, checker, note, task=t.instruction)
        who = f"adapter {mine}" if mine else "the base"
        return Route("other", message, mine, False, None, f"{_not_a_task(message)}: {who} alone, no calculator, "
                                                          f"no verifier")

    def turn(self, message: str) -> Run:
        """Answer `message` in the conversation so far with the skills that fit it (`read`); the
        route is kept as `route` and the run, with its trace, as `last`."""
        from .strategies import Solution

        if not message.strip():
            raise ValueError("empty message")
        route = self.read(message)
        self.route = route
        if self.on_event is not None:
            self.on_event(route.event())
        graph = chat_graph(adapter=route.adapter, tools=route.tools, verifier=route.verifier)
        keep = self.history if self.turns_seen is None else self.history[len(self.history) - 2 * self.turns_seen:]
        state = Solution(prompt=route.prompt, history=list(keep) if self.turns_seen != 0 else [])
        run = self.executor.run(graph, state, seed=self.seed + self.turns)
        self.turns += 1
        # the conversation as the model saw it, so later turns read the world's own forms
        self.history += [{"role": "user", "content": route.prompt}, {"role": "assistant", "content": run.text}]
        self.last = run
        return run
