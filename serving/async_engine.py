"""The engine behind a server, as coroutines: `EngineClient` sends an `engine_loop.EngineLoop` its
commands and routes its events back to the coroutines that wait for them. Two transports:
`AsyncEngine` (here) runs the loop on a thread of this process, `engine_process.EngineProcess` in a
process of its own.

The engine is not thread-safe, so everything that touches it (`open`, `fork`, `submit`, `close`,
adapter loading) runs where the loop runs, between steps, as a command. A generation job streams
its `Delta`s back to the coroutine that submitted it through an `asyncio.Queue`. Requests from any
number of clients are therefore one continuous batch: each step advances all of them together.
Closing a sequence (a client disconnected) frees its blocks before the next step.

A command sent while a step runs waits for it to end, so a request that needs k commands in a row
before its job is queued starts about k steps late, and every answer wakes the event loop. `stream`
opens a sequence and submits its job in one command that nothing waits for, and the engine closes
it when the job ends: the server sends each request's work that way.

On a thread, the engine shares this process's GIL with the event loop: every millisecond the loop
spends parsing, rendering and answering requests is a millisecond no step runs, and a step that
holds the GIL makes the loop wait (the server lost ~20% of its throughput at 32 clients on 2 cores
that way). A server therefore runs its engine in a process of its own; the thread is for tests and
for callers that want one process.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from .engine import Engine, ScoreResult
from .engine_loop import EngineDied, EngineLoop
from .sampling import SamplingParams
from .sequence import Delta

__all__ = ["AsyncEngine", "EngineClient", "EngineDied"]


class EngineClient:
    """The coroutines a server uses; a transport sends the commands (`_send`) and hands the events
    to `_dispatch` on the event loop of the coroutine that waits for them."""

    engine: Any
    """what the front end reads directly: tokenizer, max_model_len, config.vocab_size, grammars,
    registry (`name in registry`) and adapters (the `Engine` itself, on a thread)"""

    def __init__(self):
        self._keys = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, Any, str | None]] = {}
        """key -> (its loop, the future or queue that waits, the op that undoes a late result)"""

    # --------------------------------------------------------------- transport
    def _alive(self) -> bool:
        raise NotImplementedError

    def _send(self, cmd: tuple) -> None:
        raise NotImplementedError

    def _check(self) -> None:
        if not self._alive():
            raise EngineDied("the engine is not running (its thread or process is gone)")

    def _wait(self, waiter, undo: str | None = None) -> int:
        key = next(self._keys)
        self._waiting[key] = (asyncio.get_running_loop(), waiter, undo)
        return key

    def _dispatch(self, events: list[tuple]) -> None:
        """Events from the engine, on the loop of their waiters."""
        for ev in events:
            kind, key = ev[0], ev[1]
            entry = self._waiting.get(key)
            if entry is None:
                continue
            _, waiter, undo = entry
            if kind == "result":
                del self._waiting[key]
                value, error = ev[2], ev[3]
                if waiter.done():  # cancelled, nobody waits: undo what the command made
                    if undo is not None and error is None and value is not None:
                        self._undo(undo, value)
                elif error is not None:
                    waiter.set_exception(error)
                else:
                    waiter.set_result(value)
            elif kind == "delta":
                waiter.put_nowait(ev[2])
                if ev[2].finished is not None:
                    del self._waiting[key]
            elif kind == "error":
                del self._waiting[key]
                waiter.put_nowait(ev[2])

    def _fail_waiting(self, err: Exception) -> None:
        """The engine is gone: every waiter gets `err`."""
        for key, (loop, waiter, _) in list(self._waiting.items()):
            del self._waiting[key]
            if isinstance(waiter, asyncio.Queue):
                loop.call_soon_threadsafe(waiter.put_nowait, err)
            else:
                loop.call_soon_threadsafe(_set_exception, waiter, err)

    def _undo(self, op: str, value) -> None:
        if op == "close":
            self.close_nowait(*(value if isinstance(value, list) else [value]))

    # -------------------------------------------------------------- coroutines
    async def _result(self, cmd: Callable[[int], tuple], undo: str | None = None):
        self._check()
        fut = asyncio.get_running_loop().create_future()
        key = self._wait(fut, undo)
        self._send(cmd(key))
        try:
            return await fut  # cancelled while it waits: the result, when it comes, is undone (`_dispatch`)
        except asyncio.CancelledError:
            # cancelled after the result came but before this coroutine resumed: undo it here
            if undo is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                self._undo(undo, fut.result())
            raise

    async def op(self, name: str, *args, undo: str | None = None):
        """`engine_loop.OPS[name](engine, *args)` between steps; its exception is raised here. With
        `undo="close"`, what it returns (a sequence, or a list of them) is closed if the caller is
        cancelled before the result comes back (a client went away), so that nothing leaks."""
        return await self._result(lambda key: ("op", key, name, args), undo)

    async def generate(self, seq: int, params: SamplingParams, adapter: str | None = None,
                       set_adapter: bool = True, every: bool = True) -> AsyncIterator[Delta]:
        """Generate on an idle sequence (under `adapter` when `set_adapter`); yields its deltas
        (only the last with `every=False`), the last one carrying the `Completion`. The sequence
        keeps the output. Stopping the iteration early (a cancelled request) leaves the job
        running: `close` the sequence."""
        self._check()
        q: asyncio.Queue = asyncio.Queue()
        key = self._wait(q)
        self._send(("generate", key, seq, params, adapter, set_adapter, every))
        try:
            async for d in _deltas(q):
                yield d
        finally:
            self._waiting.pop(key, None)

    async def stream(self, prompt: Sequence[int], params: SamplingParams, adapter: str | None = None,
                     group: object = None, every: bool = True) -> AsyncIterator[Delta]:
        """`Engine.stream` on the engine: open a sequence holding `prompt` (under `adapter`, in
        `group`) and generate on it, then close it when the iteration ends (finished, failed or
        cancelled). Errors of `open` (KeyError: no such adapter) and of `submit` (ValueError) are
        raised here, and leave no sequence behind. One command, answered only by the job's deltas
        (see the module docstring); the sequence's id stays with the engine, which closes it when
        the job finishes, or when `end_stream` comes after an iteration that stopped early."""
        self._check()
        q: asyncio.Queue = asyncio.Queue()
        key = self._wait(q)
        self._send(("stream", key, list(prompt), params, adapter, group, every))
        finished = False
        try:
            async for d in _deltas(q):
                finished = d.finished is not None
                yield d
        finally:
            self._waiting.pop(key, None)
            if not finished and self._alive():  # ended early (cancelled, failed): the engine closes it now
                self._send(("end_stream", key))

    async def prefill(self, seq: int) -> int:
        """Compute an idle sequence's context (so that forks share it); returns the tokens computed."""
        return await self._result(lambda key: ("prefill", key, seq))

    async def score(self, seq: int, continuation: list[int], adapter: str | None = None,
                    top: int | None = None) -> ScoreResult:
        """`Engine.score_ranked` of one continuation after the idle sequence `seq`, in the shared
        batch. A cancelled caller's fork is closed (its blocks freed) before the next step."""
        self._check()
        fut = asyncio.get_running_loop().create_future()
        key = self._wait(fut)
        self._send(("score", key, seq, list(continuation), adapter, top))
        try:
            return await fut
        except asyncio.CancelledError:
            self._waiting.pop(key, None)
            if self._alive():
                self._send(("drop_score", key))
            raise

    async def close(self, *seqs: int) -> None:
        """Close sequences (running or not); returns once they are closed (their blocks free)."""
        await self._result(lambda key: ("close", list(seqs), key))

    def close_nowait(self, *seqs: int) -> None:
        """Queue the sequences' closing (safe from a cancelled coroutine); commands run in order,
        so no later command sees them."""
        if seqs and self._alive():
            self._send(("close", list(seqs)))

    async def stats(self) -> dict:
        """The engine's `stats()` and `step_seconds` (the time spent inside steps)."""
        return await self.op("stats")


class AsyncEngine(EngineClient):
    """Run `engine` on a thread of this process (see the module docstring); `start()` before use.
    `call(fn, *args)` runs any function there too."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._loop = EngineLoop(engine, self._post)
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def step_seconds(self) -> float:
        """time spent inside `engine.step()`"""
        return self._loop.step_seconds

    # ------------------------------------------------------------- lifecycle
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kilolora-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _send(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        self._wake.set()

    async def call(self, fn: Callable[..., Any], *args, undo: str | None = None) -> Any:
        """Run `fn(*args)` on the engine thread between steps; its exception is raised here (`undo`:
        see `op`)."""
        return await self._result(lambda key: ("call", key, fn, args), undo)

    # ---------------------------------------------------------- engine thread
    def _post(self, events: list[tuple]) -> None:
        """One wake-up per event loop per batch, not one per event: the loop thread competes with
        this one for the GIL."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ev in events:
            entry = self._waiting.get(ev[1])
            if entry is not None:
                by_loop.setdefault(entry[0], []).append(ev)
        for loop, evs in by_loop.items():
            loop.call_soon_threadsafe(self._dispatch, evs)

    def _run(self) -> None:
        loop = self._loop
        while not self._stop:
            self._wake.clear()
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                loop.handle(cmd)
            loop.flush()
            if not loop.has_work():
                self._wake.wait(timeout=1.0)
                continue
            loop.step()
            loop.flush()


async def _deltas(q: asyncio.Queue) -> AsyncIterator[Delta]:
    """A job's deltas from its queue, through the one that finishes it; a failure is raised."""
    while True:
        d = await q.get()
        if isinstance(d, BaseException):
            raise d
        yield d
        if d.finished is not None:
            return


def _set_exception(fut: asyncio.Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
