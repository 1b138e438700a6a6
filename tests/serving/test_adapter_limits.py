"""Adapter rank limits and memory: `max_lora_rank` refuses before allocating, and unloading shrinks the
dense stacks back to what the resident adapters need, with every remaining adapter still equal to peft."""

from __future__ import annotations

import pytest
import torch

from serving import Engine
from serving.adapters import DEFAULT_MAX_LORA_RANK, AdapterRegistry
from tests.helpers import make_peft_adapter, make_tiny_model

PEFT = {  # name -> (seed, r, target_modules); "big" adapts a slot no small adapter uses
    "small": (21, 2, ["q_proj", "v_proj"]),
    "big": (22, 32, ["q_proj", "v_proj", "down_proj"]),
    "a": (23, 4, ["q_proj", "v_proj"]),
    "b": (24, 8, ["q_proj", "o_proj"]),
    "c": (25, 2, ["v_proj", "up_proj"]),
    "d": (26, 4, ["k_proj", "v_proj"]),
}
IDS = list(range(3, 33))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny base and, per adapter name, its PEFT directory and the peft model's log-probs of IDS."""
    root = tmp_path_factory.mktemp("limits")
    make_tiny_model(root / "base", "llama", seed=7)
    adapters = {}
    for name, (seed, r, modules) in PEFT.items():
        model = make_peft_adapter(root / "base", root / name, seed=seed, r=r, lora_alpha=r, target_modules=modules)
        adapters[name] = (root / name, _peft_teacher_forced(model, IDS))
    return root / "base", adapters


def _peft_teacher_forced(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def _teacher_forced(engine: Engine, adapter: str | None) -> torch.Tensor:
    seq = engine.open(IDS[:1])
    try:
        return torch.tensor(engine.score(seq, IDS[1:], adapter=adapter))
    finally:
        engine.close(seq)


def _engine(world, *names: str) -> Engine:
    base, adapters = world
    return Engine.from_pretrained(base, adapters={n: adapters[n][0] for n in names}, kv_cache_tokens=256)


def _assert_matches_peft(engine: Engine, world, name: str) -> None:
    torch.testing.assert_close(_teacher_forced(engine, name), world[1][name][1], atol=2e-5, rtol=1e-4)


def _dense_tensors(reg: AdapterRegistry) -> dict:
    return {key: [t.data_ptr() for t in stacks] for key, stacks in reg._dense.items()}


def test_a_rank_over_max_lora_rank_is_refused_and_changes_nothing(world):
    engine = _engine(world, "small")
    reg = engine.registry
    reg.max_lora_rank = 8  # a plain attribute the server sets
    before = (reg.memory_bytes(), reg.names, _dense_tensors(reg), reg._dense_cap)
    with pytest.raises(ValueError, match=r"adapter 'big' has rank 32, over the server's max_lora_rank 8 "
                                         r"\(start it with --max-lora-rank 32 or more\)"):
        engine.load_adapter("big", world[1]["big"][0])
    # A name already taken is refused before a row is taken, too.
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter("small", world[1]["a"][0])
    assert (reg.memory_bytes(), reg.names, _dense_tensors(reg), reg._dense_cap) == before
    _assert_matches_peft(engine, world, "small")

    reg.max_lora_rank = 32  # exactly the limit is allowed
    engine.load_adapter("big", world[1]["big"][0])
    _assert_matches_peft(engine, world, "big")

    cfg = engine.model.config
    assert AdapterRegistry(cfg, torch.float32, "cpu").max_lora_rank is None  # in-process: no limit
    assert AdapterRegistry(cfg, torch.float32, "cpu", None, DEFAULT_MAX_LORA_RANK).max_lora_rank == 64
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_lora_rank must be a positive int"):
            AdapterRegistry(cfg, torch.float32, "cpu", max_lora_rank=bad)


@pytest.mark.parametrize("order", [("small", "big"), ("big", "small")])
def test_unloading_a_big_rank_returns_its_memory(world, order):
    want = _engine(world, "small").registry.memory_bytes()  # small alone, measured
    engine = _engine(world)
    assert engine.registry.memory_bytes() == 0
    base = _teacher_forced(engine, None)
    for name in order:
        engine.load_adapter(name, world[1][name][0])
    small = _teacher_forced(engine, "small")
    assert (small - base).abs().max() > 1e-2  # the adapter changes the output
    _assert_matches_peft(engine, world, "small")
    _assert_matches_peft(engine, world, "big")
    with_big = engine.registry.memory_bytes()
    assert with_big > 4 * want  # rank 32 and a third slot, padded over every row

    engine.unload_adapter("big")
    assert engine.registry.memory_bytes() == want
    assert engine.registry.get("small").index == 0
    # not bit-equal on every CPU: the dense stacks' padded rank shrinks from 32 to small's, so the
    # LoRA GEMMs sum over fewer zeros, which oneDNN / MKL may block differently (1e-7 seen)
    torch.testing.assert_close(_teacher_forced(engine, "small"), small, atol=1e-6, rtol=1e-6)
    _assert_matches_peft(engine, world, "small")


def test_unloading_from_the_middle_keeps_every_other_adapter(world):
    engine = _engine(world, "a", "b", "c")
    reg = engine.registry
    base = _teacher_forced(engine, None)
    before = {n: _teacher_forced(engine, n) for n in "abc"}
    for x, y in [("a", "b"), ("a", "c"), ("b", "c"), ("a", None)]:  # a wrong row would show
        assert (before[x] - (before[y] if y else base)).abs().max() > 1e-2
    assert [reg.get(n).index for n in "abc"] == [0, 1, 2]

    engine.unload_adapter("b")
    assert sorted(reg.get(n).index for n in "ac") == [0, 1] and reg.get("c").index == 1
    assert not any(module == "o_proj" for _, module in reg._dense)  # only b adapted o_proj: its stacks are gone
    for n in "ac":
        torch.testing.assert_close(_teacher_forced(engine, n), before[n], atol=0, rtol=0)
        _assert_matches_peft(engine, world, n)
    # A new adapter takes the freed row; nothing of b is left in it.
    engine.load_adapter("d", world[1]["d"][0])
    assert reg.get("d").index == 2
    _assert_matches_peft(engine, world, "d")

    engine.unload_adapter("a")  # the last row (d) moves to the front
    assert reg.get("d").index == 0 and reg.get("c").index == 1
    for n in "cd":
        _assert_matches_peft(engine, world, n)
    assert reg.memory_bytes() == _engine(world, "d", "c").registry.memory_bytes()


def test_unloading_every_adapter_frees_the_dense_stacks(world):
    engine = _engine(world, "a", "big", "c")
    assert engine.registry.memory_bytes("dense") > 0
    for n in ("big", "a", "c"):
        engine.unload_adapter(n)
    reg = engine.registry
    assert reg.memory_bytes("dense") == 0 and reg.memory_bytes() == 0 and not reg._dense and reg._dense_cap == 0
    engine.load_adapter("c", world[1]["c"][0])  # the stacks come back from nothing
    _assert_matches_peft(engine, world, "c")
    with pytest.raises(ValueError, match="kind must be"):
        reg.memory_bytes("lora")
