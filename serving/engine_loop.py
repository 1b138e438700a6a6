"""The engine side of a server: commands in, engine steps, events out.

`EngineLoop` owns an `Engine` and runs what its front end sends it, as plain tuples, between steps;
what comes back (a command's result, a job's deltas, a failure) are events, also plain tuples,
handed to `post` in one list per batch of commands and one per step. The same loop runs on a thread
of the server's process (`async_engine.AsyncEngine`) or as the main loop of a process of its own
(`engine_process.EngineProcess`), where the tuples cross a pipe: so everything in them pickles, and
`OPS` names every operation a front end may ask for.

Commands, each with a `key` the front end picked (it routes the events):

    ("op", key, name, args)             OPS[name](engine, *args)        -> ("result", key, value, error)
    ("call", key, fn, args)             fn(*args) (same process only)   -> ("result", key, value, error)
    ("generate", key, seq, params, adapter, set_adapter, every)         -> ("delta", key, delta)...
    ("stream", key, prompt, params, adapter, group, every)              -> ("delta", key, delta)...
    ("end_stream", key)                 close the sequence `stream` opened for key (its job ended early;
                                        a finished one closes it itself)
    ("prefill", key, seq)               -> ("result", key, tokens computed, error)
    ("score", key, seq, continuation, adapter, top)                     -> ("result", key, ScoreResult, error)
    ("drop_score", key)                 a score nobody waits for: its fork is closed
    ("close", seqs[, key])              -> ("result", key, None, None) with a key

A job's failure is ("error", key, exception). Deltas of a job that streams (`every`) all go out;
else only the finished one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import Engine


class EngineDied(RuntimeError):
    """The engine cannot serve: a step raised (every running job failed with this), or its thread
    or process is gone."""


# ------------------------------------------------------------------------------------ operations
def _open(engine: Engine, prompt, adapter, group) -> int:
    return engine.open(prompt, adapter, group)


def _fork(engine: Engine, seq: int, n: int) -> list[int]:
    return engine.fork(seq, n)


def _length(engine: Engine, seq: int) -> int:
    return len(engine.tokens(seq))


def _adapter_of(engine: Engine, seq: int) -> str | None:
    return engine.adapter_of(seq)


def _start_call(engine: Engine, seq: int, ids: list[int], fork: bool) -> int | None:
    """The sequence a tool call is written on (`ids` appended): a fork of `seq`, or `seq` itself;
    None when the context has no room for it."""
    if engine.max_model_len - len(engine.tokens(seq)) <= len(ids):
        return None  # the engine refuses to generate on a full context
    if not fork:
        engine.extend(seq, ids)
        return seq
    (f,) = engine.fork(seq, 1)
    engine.extend(f, ids)
    return f


def _adapters(engine: Engine) -> list[str]:
    return list(engine.adapters)


def _has_adapter(engine: Engine, name: str) -> bool:
    return name in engine.registry


def _add_adapter(engine: Engine, name: str, adapter, replace: bool) -> list[str]:
    engine.add_adapter(name, adapter, replace=replace)
    return list(engine.adapters)


def _unload_adapter(engine: Engine, name: str, protected: frozenset[str]) -> tuple[str, str] | list[str]:
    """Unload `name` unless protected (or a bank entry, or in use): the adapters left, or (why, message)
    with why in {missing, protected, in_use}."""
    if name not in engine.registry:
        return ("missing", f"The lora adapter '{name}' cannot be found.")
    if name in protected or engine.registry.get(name).kind == "bank":
        return ("protected", f"the adapter {name!r} is part of the server's own features or its bank and cannot "
                             f"be unloaded")
    try:
        engine.unload_adapter(name)
    except ValueError as err:
        return ("in_use", str(err))
    return list(engine.adapters)


def _stats(engine: Engine) -> dict:
    return engine.stats()  # `EngineLoop` adds its step_seconds


OPS: dict[str, Callable[..., Any]] = {
    "open": _open, "fork": _fork, "length": _length, "adapter_of": _adapter_of, "start_call": _start_call,
    "adapters": _adapters, "has_adapter": _has_adapter, "add_adapter": _add_adapter,
    "unload_adapter": _unload_adapter, "stats": _stats,
}
"""what a front end may run on the engine by name: f(engine, *args)"""


# ------------------------------------------------------------------------------------------ loop
@dataclass
class _Job:
    key: Any
    every: bool
    first_token_at: float | None = None
    """`time.monotonic()` of the job's first delta with tokens"""


class EngineLoop:
    """Runs commands on `engine` and steps it; `post(events)` gets what comes out (see the module
    docstring). Single-threaded: whoever drives it calls `handle` and `step` from one thread."""

    def __init__(self, engine: Engine, post: Callable[[list[tuple]], None]):
        self.engine, self.post = engine, post
        self._jobs: dict[int, _Job] = {}
        """sequence -> the job generating on it"""
        self._opened: dict[Any, int] = {}
        """stream key -> the sequence `stream` opened for it"""
        self._prefills: dict[int, Any] = {}
        self._scores: dict[int, Any] = {}
        """score fork -> key"""
        self._score_forks: dict[Any, int] = {}
        self._out: list[tuple] = []
        self.step_seconds = 0.0
        """time spent inside `engine.step()`"""

    def has_work(self) -> bool:
        return self.engine.has_work()

    def flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self.post(out)

    # ------------------------------------------------------------- commands
    def handle(self, cmd: tuple) -> None:
        """Run one command; its events wait for `flush`."""
        kind = cmd[0]
        key = cmd[2] if kind == "close" and len(cmd) > 2 else cmd[1] if len(cmd) > 1 and kind != "close" else None
        try:
            if kind == "op":
                value = OPS[cmd[2]](self.engine, *cmd[3])
                if cmd[2] == "stats":
                    value["step_seconds"] = self.step_seconds
                self._result(key, value)
            elif kind == "call":
                self._result(key, cmd[2](*cmd[3]))
            elif kind == "generate":
                self._generate(*cmd[1:])
            elif kind == "stream":
                self._stream(*cmd[1:])
            elif kind == "end_stream":
                seq = self._opened.pop(key, None)
                if seq is not None:
                    self._close(seq)
            elif kind == "prefill":
                if self.engine.submit_prefill(cmd[2]):
                    self._prefills[cmd[2]] = key
                else:
                    self._result(key, 0)
            elif kind == "score":
                f = self.engine.submit_score(*cmd[2:])
                self._scores[f], self._score_forks[key] = key, f
            elif kind == "drop_score":
                f = self._score_forks.pop(key, None)
                if f is not None and self._scores.pop(f, None) is not None:
                    self.engine.close(f)
            elif kind == "close":
                for s in cmd[1]:
                    self._close(s)
                if len(cmd) > 2:  # someone waits for it
                    self._result(cmd[2], None)
            else:
                raise ValueError(f"unknown engine command {kind!r}")
        except Exception as err:  # the command's caller gets it; the engine goes on
            if kind in ("generate", "stream"):
                self._out.append(("error", key, err))
            elif kind not in ("end_stream", "drop_score") and key is not None:
                self._out.append(("result", key, None, err))

    def _result(self, key, value, error=None) -> None:
        self._out.append(("result", key, value, error))

    def _close(self, seq: int) -> None:
        self._jobs.pop(seq, None)
        self._prefills.pop(seq, None)
        self.engine.close(seq)

    def _generate(self, key, seq: int, params, adapter: str | None, set_adapter: bool, every: bool) -> None:
        if set_adapter and self.engine.adapter_of(seq) != adapter:
            self.engine.set_adapter(seq, adapter)
        self.engine.submit(seq, params)
        self._jobs[seq] = _Job(key, every)

    def _stream(self, key, prompt: Sequence[int], params, adapter: str | None, group, every: bool) -> None:
        seq = self.engine.open(prompt, adapter, group)
        try:
            self.engine.submit(seq, params)
        except Exception:
            self.engine.close(seq)
            raise
        self._opened[key] = seq
        self._jobs[seq] = _Job(key, every)

    # ---------------------------------------------------------------- steps
    def step(self) -> None:
        """One engine step; its deltas and settled jobs go out at the next `flush`."""
        t = time.perf_counter()
        try:
            deltas = self.engine.step()
        except Exception as err:  # a bug in a step must not hang every client: fail them all
            self._fail_all(err)
            return
        finally:
            self.step_seconds += time.perf_counter() - t
        for d in deltas:
            job = self._jobs.get(d.seq)
            if job is None:
                continue
            if job.first_token_at is None and d.token_ids:
                job.first_token_at = time.monotonic()
            if d.finished is not None:
                d.first_token_at = job.first_token_at
                del self._jobs[d.seq]
                self.engine.wait([d.seq])  # returns at once: clears the finished job
                if self._opened.get(job.key) == d.seq:  # `stream` owns its sequence: done with it
                    del self._opened[job.key]
                    self.engine.close(d.seq)
            elif not job.every:
                continue
            self._out.append(("delta", job.key, d))
        for seq, key in list(self._prefills.items()):
            if not self.engine.running(seq):
                del self._prefills[seq]
                (c,) = self.engine.wait([seq])
                self._result(key, c.counters.prefilled, RuntimeError(c.error) if c.error else None)
        for fork, key in list(self._scores.items()):
            if not self.engine.running(fork):
                del self._scores[fork]
                self._score_forks.pop(key, None)
                try:
                    self._result(key, self.engine.score_result(fork))
                except RuntimeError as err:  # the score failed (the step isolated it)
                    self._result(key, None, err)

    def _fail_all(self, err: Exception) -> None:
        died = EngineDied(f"engine step failed: {err!r}")
        for seq, job in list(self._jobs.items()):
            self._out.append(("error", job.key, died))
        for seq, key in list(self._prefills.items()):
            self._result(key, None, died)
        for fork, key in list(self._scores.items()):
            self._result(key, None, died)
        for seq in [*self._jobs, *self._prefills, *self._scores]:
            try:
                self.engine.close(seq)
            except Exception:  # closing is best effort here: the error above is what matters
                pass
        self._jobs.clear(), self._prefills.clear(), self._scores.clear(), self._score_forks.clear()
