"""The engine thread behind the server (`serving.async_engine.AsyncEngine`): what a request costs in
engine steps before its job runs, and that every sequence it opens is closed however it ends.
References: the in-process `Engine` on the same prompts (greedy tokens), and the engine's own call
log (which commands ran between which steps)."""

from __future__ import annotations

import asyncio

import pytest

from serving import Engine, SamplingParams
from tests.helpers import make_tiny_model

LONG = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("async_engine")
    make_tiny_model(path, "llama", seed=5)
    return path


@pytest.fixture()
def logged(model_dir):
    """An engine whose open / submit / step / close calls are logged in order (on the engine thread)."""
    eng = Engine.from_pretrained(model_dir, kv_cache_tokens=1024, block_size=4)
    log: list[tuple[str, object]] = []
    for name in ("open", "submit", "step", "close"):
        def wrap(fn, name=name):
            def logged_call(*args, **kw):
                out = fn(*args, **kw)
                log.append((name, out if name == "open" else args[0] if args else None))
                return out
            return logged_call
        setattr(eng, name, wrap(getattr(eng, name)))
    return eng, log


async def _busy(ae, seq: int) -> asyncio.Task:
    """A long job on `seq`, running once this returns (its first delta has arrived)."""
    started = asyncio.Event()

    async def run():
        async for _ in ae.generate(seq, LONG):
            started.set()
    task = asyncio.create_task(run())
    await started.wait()
    return task


def test_stream_opens_and_submits_in_one_command_on_a_busy_engine(logged):
    """On an engine that is stepping, `stream` opens and submits with no step between them (two
    commands would each wait for a step to end); it gives the in-process engine's tokens, and its
    sequence is closed when it ends."""
    from serving.async_engine import AsyncEngine

    eng, log = logged
    prompt = [5, 9, 11, 7, 3, 21]
    [ref] = eng.generate([prompt], params=SHORT)
    assert ref.token_ids  # non-vacuous: it generates
    log.clear()
    ae = AsyncEngine(eng).start()

    async def main():
        bg = await ae.call(eng.open, [4, 8, 15, 16, 23, 42])
        task = await _busy(ae, bg)
        out = [d async for d in ae.stream(prompt, SHORT)]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ae.close(bg)
        return out

    try:
        deltas = asyncio.run(main())
    finally:
        ae.shutdown()
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    seq = deltas[-1].seq
    i = log.index(("open", seq))
    assert log[i + 1] == ("submit", seq), log[i:i + 3]  # no step in between
    # the engine was busy: the long job had stepped before the request came, and steps on after it
    assert any(name == "step" for name, _ in log[:i]) and ("close", log[0][1]) in log[i:]
    assert ("close", seq) in log[i:]
    assert seq not in eng.scheduler.seqs


def test_stream_errors_leave_no_sequence(logged):
    """A job `submit` refuses (a prompt that fills the context: no room to generate) or an unknown
    adapter (`open` refuses it) raises from `stream`, and no sequence is left open."""
    from serving.async_engine import AsyncEngine

    eng, _ = logged
    ae = AsyncEngine(eng).start()

    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in ae.stream([5] * eng.max_model_len, SHORT):
                pass
        with pytest.raises(KeyError, match="no adapter named"):
            async for _ in ae.stream([5] * 8, SHORT, adapter="nobody"):
                pass

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()
    assert not eng.scheduler.seqs


def test_stream_cancelled_closes_its_sequence(logged):
    """A client that goes away mid-generation: its task is cancelled and the sequence closed."""
    from serving.async_engine import AsyncEngine

    eng, log = logged
    ae = AsyncEngine(eng).start()

    async def main():
        seen = asyncio.Event()

        async def client():
            async for _ in ae.stream([5, 6, 7], LONG):
                seen.set()
        task = asyncio.create_task(client())
        await seen.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(200):  # the close is queued for the engine thread
            if not await ae.call(lambda: list(eng.scheduler.seqs)):
                return
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()
    assert not eng.scheduler.seqs
    assert sum(name == "close" for name, _ in log) >= 1


def test_a_model_unloaded_after_the_check_is_a_404(model_dir):
    """`adapter_for` reads the registry from the event loop; an adapter gone by the time the job
    opens is answered as a model that does not exist (404), as the check itself would."""
    from serving.async_engine import AsyncEngine
    from serving.openai.protocol import APIError
    from serving.openai.serving import Prepared, Serving

    eng = Engine.from_pretrained(model_dir, kv_cache_tokens=1024, block_size=4)
    srv = Serving(AsyncEngine(eng).start())
    try:
        with pytest.raises(APIError) as err:
            asyncio.run(srv.adapter_for("nobody"))
        assert err.value.status == 404
        assert asyncio.run(srv.adapter_for("base")) is None
        with pytest.raises(APIError) as err:
            asyncio.run(srv.run(Prepared([5, 6, 7], "gone", SHORT, 1)))
        assert err.value.status == 404 and "gone" in str(err.value.body())
    finally:
        srv.ae.shutdown()
    assert not eng.scheduler.seqs
