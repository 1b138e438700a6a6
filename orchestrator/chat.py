"""A chat session over any backend: each turn runs `strategies.chat_graph` (tool calls proposed by
the tool selector before each step, the answer by the base or a chosen adapter, the verifier's
score at the end) and keeps the conversation. The terminal UI is `cli/chat.py`; this module has
no terminal code, so it is driven the same way in tests and in other front ends.
"""

from __future__ import annotations

from collections.abc import Callable

from .backend import Backend
from .executor import Executor, Run
from .strategies import chat_graph


class ChatSession:
    """Turns of a conversation on `backend` with a world's skills (see the module docstring)."""

    def __init__(self, backend: Backend, skills: dict, adapters: list[str], *, tools: bool = True,
                 verify: bool = True, seed: int = 0, turns: int | None = None, on_event: Callable[[dict], None] | None = None,
                 on_text: Callable[[dict], None] | None = None):
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
        self.executor = Executor(backend, skills, on_event=on_event, on_text=on_text)

    @classmethod
    def for_world(cls, world=None, url: str | None = None, **kw) -> ChatSession:
        """In-process on the world's engine, or against the server at `url` serving that world."""
        from skills.world import World

        world = world if world is not None else World.load()
        skills = {s.name: s for s in world.skills()}
        if url is None:
            from .backend import EngineBackend

            backend = EngineBackend.from_world(world)
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
        return cls(backend, skills, adapters, **kw)

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
        self.last = None

    def turn(self, message: str) -> Run:
        """Answer `message` in the conversation so far; the run's trace is kept as `last`."""
        from .strategies import Solution

        if not message.strip():
            raise ValueError("empty message")
        graph = chat_graph(adapter=self.adapter, tools=self.tools, verifier="verifier" if self.verify else None)
        keep = self.history if self.turns_seen is None else self.history[len(self.history) - 2 * self.turns_seen:]
        state = Solution(prompt=message, history=list(keep) if self.turns_seen != 0 else [])
        run = self.executor.run(graph, state, seed=self.seed + self.turns)
        self.turns += 1
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": run.text}]
        self.last = run
        return run
