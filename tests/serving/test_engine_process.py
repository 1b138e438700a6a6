"""The engine in a process of its own (`serving.engine_process.EngineProcess`): the same answers as
the engine in process, errors that cross the pipe as what they were, and a child that dies failing
every request instead of hanging it. References: the in-process `Engine` on the same checkpoint."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from serving import Engine, SamplingParams
from tests.helpers import make_tiny_model

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
KW = dict(kv_cache_tokens=1024, block_size=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_process")
    make_tiny_model(path, "llama", seed=3)
    return path


def _process(model_dir):
    from serving.engine_process import EngineProcess, EngineSpec
    from transformers import AutoTokenizer

    spec = EngineSpec("serving.engine:Engine.from_pretrained", dict(path=str(model_dir), **KW), torch_threads=1)
    return EngineProcess(spec, AutoTokenizer.from_pretrained(str(model_dir)), startup_s=300)


def test_the_process_answers_as_the_engine_does(model_dir):
    """Streams, forks and ops through the pipe give the in-process engine's tokens and logprobs;
    an unknown adapter is a KeyError and a refused job a ValueError, as in process; nothing stays open."""
    ref_eng = Engine.from_pretrained(model_dir, **KW)
    prompt, other = [5, 9, 11, 7, 3, 21], [4, 8, 15, 16]
    [ref] = ref_eng.generate([prompt], params=GREEDY)
    [ref2] = ref_eng.generate([other], params=GREEDY)
    assert ref.token_ids != ref2.token_ids  # non-vacuous: the prompts give different outputs
    ep = _process(model_dir)
    assert ep.engine.max_model_len == ref_eng.max_model_len and ep.engine.adapters == ref_eng.adapters

    async def main():
        ep.start()
        a, b = await asyncio.gather(*[_collect(ep.stream(p, GREEDY)) for p in (prompt, other)])
        seq = await ep.op("open", other, None, None)
        assert await ep.op("length", seq) == len(other)
        (f,) = await ep.op("fork", seq, 1)
        fork_out = await _collect(ep.generate(f, GREEDY))
        await ep.close(seq, f)
        with pytest.raises(KeyError, match="no adapter named"):
            await _collect(ep.stream(prompt, GREEDY, adapter="nobody"))
        with pytest.raises(ValueError, match="max_model_len"):
            await _collect(ep.stream([5] * ep.engine.max_model_len, GREEDY))
        st = await ep.stats()
        return a, b, fork_out, st

    try:
        a, b, fork_out, st = asyncio.run(main())
    finally:
        ep.shutdown()
    for got, want in ((a, ref), (b, ref2), (fork_out, ref2)):
        assert got.token_ids == want.token_ids
        assert [t.logprob for t in got.logprobs] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert st["open_sequences"] == 0 and st["blocks_used"] == 0 and st["step_seconds"] > 0


def test_a_child_that_dies_fails_its_requests(model_dir):
    """Killed mid-generation: the waiting stream raises EngineDied, and so does every later call."""
    from serving.engine_loop import EngineDied

    ep = _process(model_dir)

    async def main():
        ep.start()
        seen = asyncio.Event()

        async def client():
            async for _ in ep.stream([5, 6, 7], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)):
                if not seen.is_set():
                    seen.set()
                    os.kill(ep.pid, signal.SIGKILL)
        with pytest.raises(EngineDied):
            await asyncio.wait_for(client(), 60)
        with pytest.raises(EngineDied):
            await ep.op("stats")

    try:
        asyncio.run(main())
    finally:
        ep.shutdown()


def test_a_child_that_stops_reading_never_blocks_the_event_loop(model_dir):
    """The child stopped (SIGSTOP) while thousands of commands go out, more than the pipe holds:
    the event loop keeps running (commands are sent from a writer thread), and once the child goes
    on every command is answered, in order."""
    ep = _process(model_dir)

    async def main():
        ep.start()
        os.kill(ep.pid, signal.SIGSTOP)
        try:
            ops = [asyncio.ensure_future(ep.op("has_adapter", "x" * 800)) for _ in range(3000)]  # ~2.5 MB
            t = asyncio.get_running_loop().time()
            await asyncio.sleep(0.2)
            waited = asyncio.get_running_loop().time() - t
            assert waited < 5 and not any(op.done() for op in ops)
        finally:
            os.kill(ep.pid, signal.SIGCONT)
        return await asyncio.wait_for(asyncio.gather(*ops), 120)

    try:
        assert asyncio.run(main()) == [False] * 3000
    finally:
        ep.shutdown()


def test_a_build_that_fails_is_raised_as_it_was(tmp_path):
    """A checkpoint the child cannot load: the constructor raises its error (not a timeout)."""
    from serving.engine_process import EngineProcess, EngineSpec

    with pytest.raises((OSError, ValueError)):
        EngineProcess(EngineSpec("serving.engine:Engine.from_pretrained", dict(path=str(tmp_path / "missing"))), None,
                      startup_s=300)


async def _collect(deltas):
    """The finished Completion of a job's deltas."""
    async for d in deltas:
        if d.finished is not None:
            return d.finished
