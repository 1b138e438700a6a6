"""The engine in a process of its own, behind the same coroutines as on a thread (`EngineClient`).

Why: on a thread of the server's process, the engine and the event loop share one GIL, and the
loop's Python work per request (HTTP parsing, routing, validation, rendering, tokenizing, answering:
2-3 ms on a 2-core VM) is time no step runs; at 32 clients the server did ~20% less than the engine
in process. Here the `EngineLoop` is the child's main loop: it reads commands from a pipe between
steps and writes each batch of events back as one message, so a step never waits for the front end
and the front end never waits for a step (vLLM's API server and EngineCore are split the same way).

The child is spawned (a fresh interpreter: no forked OpenMP or torch state) and builds its engine
with `EngineSpec.builder`, a function named as `module:function` so that it can be imported there;
it then sends what the front end reads directly (`EngineInfo`: context length, vocabulary, end
tokens, adapter names). The front end keeps the tokenizer (and the structured-output grammars) of
its own and a copy of the adapter names, changed only through this object (`add_adapter`,
`unload_adapter`), so a request's model is checked without a round trip. If the child dies, every
waiting request fails with `EngineDied`, and so does every later one.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace

from .async_engine import EngineClient
from .engine_loop import EngineDied, EngineLoop
from .structured import Grammars

log = logging.getLogger("kilolora.server")


@dataclass
class EngineSpec:
    """How the engine process builds its engine."""

    builder: str
    """`module:function` (or `module:Class.method`), importable in a fresh interpreter; called with
    `kwargs`, it returns an `Engine`"""
    kwargs: dict = field(default_factory=dict)
    torch_threads: int | None = None
    """set before building (None: torch's default)"""


class EngineInfo:
    """What the front end reads without asking the engine: the tokenizer, `max_model_len`,
    `config.vocab_size`, `eos_token_ids`, `grammars`, and the adapter names (`registry`, `adapters`)."""

    def __init__(self, tokenizer, info: dict):
        self.tokenizer = tokenizer
        self.max_model_len = info["max_model_len"]
        self.config = SimpleNamespace(vocab_size=info["vocab_size"])
        self.eos_token_ids = set(info["eos_token_ids"])
        self.grammars = Grammars(tokenizer, info["vocab_size"], self.eos_token_ids) if tokenizer is not None else None
        self.registry: frozenset[str] = frozenset(info["adapters"])
        self._adapters = list(info["adapters"])

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def set_adapters(self, names: list[str]) -> None:
        self._adapters, self.registry = list(names), frozenset(names)


class EngineProcess(EngineClient):
    """The engine of `spec`, in a child process (see the module docstring). The constructor waits
    until it is built (`startup_s` at most); `start()` on the event loop that will use it."""

    def __init__(self, spec: EngineSpec, tokenizer, *, startup_s: float = 900.0):
        super().__init__()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_child_main, args=(spec, child), name="kilolora-engine", daemon=True)
        self._proc.start()
        child.close()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: str | None = None
        if not self._conn.poll(startup_s):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not start within {startup_s:g} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while starting (exit code {self._proc.exitcode})") from None
        if kind != "ready":
            self._proc.join(5)
            err, tb = payload
            if isinstance(err, (ValueError, KeyError, OSError)):  # bad input: raised as it was raised there
                raise err
            raise RuntimeError(f"the engine process could not build its engine:\n{tb}")
        self.engine = EngineInfo(tokenizer, payload)
        self.pid = self._proc.pid
        # Commands go out through a thread of their own: a send blocks while the pipe is full, and
        # the child may itself be blocked sending events the event loop has not read yet; were the
        # loop to send, neither side would read again (a long prompt beside a big batch of deltas).
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="kilolora-engine-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------- lifecycle
    def start(self) -> EngineProcess:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._readable)
        return self

    def shutdown(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._loop = None
        if self._dead is None:
            self._out.put(("stop",))
        self._out.put(None)  # the writer ends after what it holds
        self._writer.join(10)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._dead = self._dead or "shut down"
        self._conn.close()

    # ------------------------------------------------------------- transport
    def _alive(self) -> bool:
        return self._dead is None and self._loop is not None

    def _send(self, cmd: tuple) -> None:
        self._check()
        self._out.put(cmd)

    def _write(self) -> None:
        """The writer thread: commands to the child, in order, until None."""
        while (cmd := self._out.get()) is not None:
            try:
                self._conn.send(cmd)
            except (OSError, ValueError) as err:  # BrokenPipeError: the child is gone; ValueError: closed
                loop = self._loop
                if loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(self._died, f"the engine process is gone ({err})")
                return

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                events = self._conn.recv()
                try:
                    self._dispatch(events)
                except Exception:  # a bug here must not stop the reader: the other requests go on
                    log.exception("dispatching the engine's events failed")
        except (EOFError, OSError):
            self._proc.join(1)
            self._died(f"the engine process exited (exit code {self._proc.exitcode})")

    def _died(self, why: str) -> None:
        if self._dead is not None:
            return
        self._dead = why
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        self._fail_waiting(EngineDied(why))

    def _check(self) -> None:
        if self._dead is not None:
            raise EngineDied(self._dead)
        if self._loop is None:
            raise EngineDied("the engine process is not started (call start() on the event loop)")

    # ---------------------------------------------------------- coroutines
    async def op(self, name: str, *args, undo: str | None = None):
        value = await super().op(name, *args, undo=undo)
        if name in ("add_adapter", "unload_adapter") and isinstance(value, list):
            self.engine.set_adapters(value)  # the names change only through here
        return value


# ------------------------------------------------------------------------------- the child
def _child_main(spec: EngineSpec, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    try:
        if spec.torch_threads is not None:
            import torch

            torch.set_num_threads(spec.torch_threads)
        module, _, name = spec.builder.partition(":")
        engine = functools.reduce(getattr, name.split("."), importlib.import_module(module))(**spec.kwargs)
    except BaseException as err:  # reported to the parent, which raises it
        conn.send(("failed", (_portable(err), traceback.format_exc())))
        return
    conn.send(("ready", {"max_model_len": engine.max_model_len, "vocab_size": engine.config.vocab_size,
                         "eos_token_ids": sorted(engine.eos_token_ids), "adapters": list(engine.adapters),
                         "pid": os.getpid()}))
    loop = EngineLoop(engine, lambda events: _post(conn, events))
    while True:
        # block for commands only when there is nothing to step
        if conn.poll(0 if loop.has_work() else None):
            while True:
                try:
                    cmd = conn.recv()
                except EOFError:  # the front end is gone
                    return
                if cmd[0] == "stop":
                    loop.flush()
                    return
                loop.handle(cmd)
                if not conn.poll():
                    break
            loop.flush()
        if loop.has_work():
            loop.step()
            loop.flush()


def _post(conn, events: list[tuple]) -> None:
    conn.send([tuple(_portable(x) if isinstance(x, BaseException) else x for x in ev) for ev in events])


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling both ways (an exception whose constructor takes other arguments
    than its `args` does not unpickle), else the nearest built-in type with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any failure: fall back to the message
        base = next(t for t in type(err).__mro__ if t.__module__ == "builtins")
        return (base if issubclass(base, Exception) else RuntimeError)(str(err))
