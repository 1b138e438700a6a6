"""The engine behind a server: one thread owns the `Engine` and steps it; coroutines send it work.

The engine is not thread-safe, so every call that touches it (`open`, `fork`, `submit`, `close`,
adapter loading) runs on the engine thread between steps, through `call`. A generation job streams
its `Delta`s back to the coroutine that submitted it through an `asyncio.Queue`. Requests from any
number of clients are therefore one continuous batch: each `step()` advances all of them together.
Closing a sequence (a client disconnected) frees its blocks before the next step.

A command sent while a step runs waits for it to end, so a request that needs k commands in a row
before its job is queued starts about k steps late; and every answer wakes the event loop, which
then takes the GIL from the engine thread. `stream` opens a sequence and submits its job in one
command that nothing waits for, and closes it with another: the server sends each request's work
that way.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import Engine, ScoreResult
from .sampling import SamplingParams
from .sequence import Delta


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    every: bool = True
    """deliver every delta (streaming), or only the finished one"""
    first_token_at: float | None = None
    """`time.monotonic()` of the job's first delta with tokens"""


class EngineDied(RuntimeError):
    """A step raised: the engine thread failed every running job with this error."""


class AsyncEngine:
    """Run `engine` on its own thread (see the module docstring); `start()` before use."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, _Stream] = {}
        self._prefills: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._scores: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        """running `score` forks"""
        self._stop = False
        self._thread: threading.Thread | None = None
        self.step_seconds = 0.0
        """time spent inside `engine.step()` (for the benchmark's accounting)"""

    # ------------------------------------------------------------- lifecycle
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kilolora-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------ coroutines
    async def call(self, fn: Callable[..., Any], *args, undo: Callable[[Any], Any] | None = None) -> Any:
        """Run `fn(*args)` on the engine thread between steps; its exception is raised here.

        `fn` runs even if the caller is cancelled while it waits (a client went away); then
        `undo(result)` runs on the engine thread after it, so that what `fn` made (the sequences
        it opened or forked) does not leak."""
        if self._thread is None or not self._thread.is_alive():
            raise EngineDied("the engine thread is not running")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        made = []

        def run():
            made.append(fn(*args))
            return made[0]

        def unmake():
            if made:
                undo(made[0])

        self._commands.put((run, (), loop, fut))
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            if undo is not None:  # commands run in order: `unmake` runs after `run`
                self._commands.put((unmake, (), None, None))
                self._wake.set()
            raise

    async def generate(self, seq: int, params: SamplingParams, adapter: str | None = None,
                       set_adapter: bool = True, every: bool = True) -> AsyncIterator[Delta]:
        """Generate on an idle sequence (under `adapter` when `set_adapter`); yields its deltas
        (only the last with `every=False`), the last one carrying the `Completion`. The sequence
        keeps the output. Stopping the iteration early (a cancelled request) leaves the job
        running: `close` the sequence."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def submit():
            if set_adapter and self.engine.adapter_of(seq) != adapter:
                self.engine.set_adapter(seq, adapter)
            self.engine.submit(seq, params)
            self._streams[seq] = _Stream(loop, q, every)

        await self.call(submit)
        async for d in _deltas(q):
            yield d

    async def stream(self, prompt: Sequence[int], params: SamplingParams, adapter: str | None = None,
                     group: object = None, every: bool = True) -> AsyncIterator[Delta]:
        """`Engine.stream` on the engine thread: open a sequence holding `prompt` (under `adapter`, in
        `group`) and generate on it, then close it when the iteration ends (finished, failed or
        cancelled). Errors of `open` (KeyError: no such adapter) and of `submit` (ValueError) are
        raised here, and leave no sequence behind.

        Opening and submitting are one command, sent without waiting for an answer: the job joins
        the next step, and the event loop is woken only for the job's deltas. (As `call(open)`, then
        `generate`, each command waits for a step to end and wakes the loop with its result, and
        on a busy engine the request starts a step later.) The sequence's id stays on the engine
        thread, where the closing command, queued after the opening one, reads it."""
        if self._thread is None or not self._thread.is_alive():
            raise EngineDied("the engine thread is not running")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        opened: list[int] = []

        def submit():
            try:
                seq = self.engine.open(prompt, adapter, group)
                try:
                    self.engine.submit(seq, params)
                except Exception:
                    self.engine.close(seq)
                    raise
            except Exception as err:  # raised to the caller by `_deltas`
                loop.call_soon_threadsafe(q.put_nowait, err)
                return
            opened.append(seq)
            self._streams[seq] = _Stream(loop, q, every)

        def close():
            for seq in opened:
                self._streams.pop(seq, None)
                self.engine.close(seq)

        self._commands.put((submit, (), None, None))
        self._wake.set()
        try:
            async for d in _deltas(q):
                yield d
        finally:
            self._commands.put((close, (), None, None))  # after `submit`: commands run in order
            self._wake.set()

    async def prefill(self, seq: int) -> int:
        """Compute an idle sequence's context (so that forks share it); returns the tokens computed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def submit():
            if self.engine.submit_prefill(seq):
                self._prefills[seq] = (loop, fut)
            else:  # a future is the event loop's: set it there
                loop.call_soon_threadsafe(_settle, fut, 0, None)

        await self.call(submit)
        return await fut

    async def score(self, seq: int, continuation: list[int], adapter: str | None = None,
                    top: int | None = None) -> ScoreResult:
        """`Engine.score_ranked` of one continuation after the idle sequence `seq`, in the shared
        batch. A cancelled caller's fork is closed (its blocks freed) before the next step."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def submit():
            f = self.engine.submit_score(seq, continuation, adapter, top)
            self._scores[f] = (loop, fut)
            return f

        fork = await self.call(submit, undo=self._drop_score)
        try:
            return await fut
        except asyncio.CancelledError:
            self._commands.put((self._drop_score, (fork,), None, None))
            self._wake.set()
            raise

    def _drop_score(self, fork: int) -> None:
        if self._scores.pop(fork, None) is not None:
            self.engine.close(fork)

    async def close(self, *seqs: int) -> None:
        """Close sequences (running or not): their blocks are free for the next step."""
        def close():
            for s in seqs:
                self._streams.pop(s, None)
                self._prefills.pop(s, None)
                self.engine.close(s)

        await self.call(close)

    def close_nowait(self, *seqs: int) -> None:
        """Queue the sequences' closing without waiting (safe from a cancelled coroutine)."""
        def close():
            for s in seqs:
                self._streams.pop(s, None)
                self._prefills.pop(s, None)
                self.engine.close(s)

        self._commands.put((close, (), None, None))
        self._wake.set()

    async def stats(self) -> dict:
        return await self.call(self.engine.stats)

    # ---------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()
            self._run_commands()
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                continue
            t = time.perf_counter()
            try:
                deltas = self.engine.step()
            except Exception as err:  # a bug in a step must not hang every client: fail them all
                self._fail_all(err)
                continue
            finally:
                self.step_seconds += time.perf_counter() - t
            # One wake-up per event loop per step, not one per delta: the loop thread competes with
            # this one for the GIL, and with 32 streams per-delta wake-ups cost ~10% of throughput.
            out: dict[asyncio.AbstractEventLoop, list] = {}
            for d in deltas:
                st = self._streams.get(d.seq)
                if st is None:
                    continue
                if st.first_token_at is None and d.token_ids:
                    st.first_token_at = time.monotonic()
                if d.finished is not None:
                    d.first_token_at = st.first_token_at
                    self._streams.pop(d.seq)
                    self.engine.wait([d.seq])  # returns at once: clears the finished job
                elif not st.every:
                    continue
                out.setdefault(st.loop, []).append((st.queue, d))
            for loop, items in out.items():
                loop.call_soon_threadsafe(_deliver, items)
            for seq, (loop, fut) in list(self._prefills.items()):
                if not self.engine.running(seq):
                    del self._prefills[seq]
                    (c,) = self.engine.wait([seq])
                    error = RuntimeError(c.error) if c.error else None
                    loop.call_soon_threadsafe(_settle, fut, c.counters.prefilled, error)
            for fork, (loop, fut) in list(self._scores.items()):
                if not self.engine.running(fork):
                    del self._scores[fork]
                    try:
                        result, error = self.engine.score_result(fork), None
                    except RuntimeError as err:  # the score failed (the step isolated it)
                        result, error = None, err
                    loop.call_soon_threadsafe(_settle, fut, result, error)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, loop, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(*args), None
            except Exception as err:
                result, error = None, err
            if fut is not None:
                loop.call_soon_threadsafe(_settle, fut, result, error)

    def _fail_all(self, err: Exception) -> None:
        for seq, st in list(self._streams.items()):
            self._streams.pop(seq)
            try:
                self.engine.close(seq)
            except Exception:  # closing is best effort here: the error below is what matters
                pass
            st.loop.call_soon_threadsafe(st.queue.put_nowait, EngineDied(f"engine step failed: {err!r}"))
        for seq, (loop, fut) in list(self._prefills.items()):
            self._prefills.pop(seq)
            try:
                self.engine.close(seq)
            except Exception:
                pass
            loop.call_soon_threadsafe(_settle, fut, None, EngineDied(f"engine step failed: {err!r}"))
        for fork, (loop, fut) in list(self._scores.items()):
            self._scores.pop(fork)
            try:
                self.engine.close(fork)
            except Exception:
                pass
            loop.call_soon_threadsafe(_settle, fut, None, EngineDied(f"engine step failed: {err!r}"))


async def _deltas(q: asyncio.Queue) -> AsyncIterator[Delta]:
    """A job's deltas from its queue, through the one that finishes it; a failure is raised."""
    while True:
        d = await q.get()
        if isinstance(d, BaseException):
            raise d
        yield d
        if d.finished is not None:
            return


def _deliver(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for q, d in items:
        q.put_nowait(d)


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
