"""PEFT I/O against real `peft` adapters, and the validation of bad input."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

from compression import Collection, find_adapter_dirs, load_adapter, load_collection, save_adapter
from compression.peft_io import lora_scaling
from tests.helpers import make_peft_adapter

CASES = {
    "plain": dict(r=2, lora_alpha=4),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "alpha_pattern": dict(r=3, lora_alpha=6, alpha_pattern={"v_proj": 12}),
    "rank_pattern": dict(r=2, lora_alpha=8, rank_pattern={"q_proj": 5}, target_modules=["q_proj", "k_proj", "v_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_load_folds_scaling_like_peft(tiny_llama_dir, tmp_path, case):
    model = make_peft_adapter(tiny_llama_dir, tmp_path / case, seed=1, **CASES[case])
    adapter = load_adapter(tmp_path / case)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}
    assert len(layers) == len(adapter.lora_A) > 0
    for name, layer in layers.items():
        target = name  # named_modules of the PeftModel: base_model.model.model.layers.0...
        expected = layer.get_delta_weight("default").detach()
        assert expected.abs().max() > 1e-3  # non-vacuous
        torch.testing.assert_close(adapter.delta(target), expected, rtol=1e-5, atol=1e-6)
    assert adapter.r == CASES[case]["r"]


def test_scaling_rules():
    assert lora_scaling({"lora_alpha": 16}, "x.q_proj", 8) == 2.0
    assert lora_scaling({"lora_alpha": 16, "use_rslora": True}, "x.q_proj", 4) == 8.0
    assert lora_scaling({"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}, "a.layers.0.v_proj", 2) == 2.0
    assert lora_scaling({"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}, "a.layers.0.q_proj", 2) == 8.0
    assert math.isclose(lora_scaling({}, "q", 4), 2.0)  # a config without lora_alpha gets peft's default, 8


def test_metadata_kept(tiny_llama_dir, tmp_path):
    make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=2, r=2, alora_invocation_tokens=[5, 6])
    adapter = load_adapter(tmp_path / "a")
    assert adapter.alora_invocation_tokens == [5, 6]
    assert adapter.base_model_name_or_path == str(tiny_llama_dir)


def test_save_adapter_roundtrip_with_alpha(tmp_path):
    g = torch.Generator().manual_seed(0)
    A = {"base_model.model.model.layers.0.self_attn.q_proj": torch.randn(3, 8, generator=g)}
    B = {"base_model.model.model.layers.0.self_attn.q_proj": torch.randn(6, 3, generator=g)}
    save_adapter(tmp_path / "x", A, B, {"target_modules": ["q_proj"]}, lora_alpha=12.0)
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 12.0
    back = load_adapter(tmp_path / "x")
    target = next(iter(A))
    torch.testing.assert_close(back.delta(target), B[target] @ A[target])
    with pytest.raises(ValueError, match="already exists"):
        save_adapter(tmp_path / "x", A, B, {})


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def good_adapter(tiny_llama_dir, tmp_path):
    make_peft_adapter(tiny_llama_dir, tmp_path / "good", seed=3, r=2)
    return tmp_path / "good"


def test_pickle_weights_are_refused_by_name(good_adapter, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(good_adapter / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*pickle"):
        load_adapter(bad)


def test_corrupt_safetensors(good_adapter):
    f = good_adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(ValueError, match="corrupt safetensors"):
        load_adapter(good_adapter)


def test_nan_weights(good_adapter):
    f = good_adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_adapter(good_adapter)


def test_unsupported_tensors_and_types(good_adapter, tmp_path):
    cfg = json.loads((good_adapter / "adapter_config.json").read_text())
    (good_adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(good_adapter)
    (good_adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        load_adapter(good_adapter)
    (good_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_adapter(good_adapter)
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model.embed.lora_embedding_A": torch.zeros(2, 4)}, str(emb / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unsupported tensor"):
        load_adapter(emb)


def test_collection_rejects_mismatched_shapes(tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=4, r=2)
    other = tmp_path / "other_base"
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(other)
    make_peft_adapter(other, tmp_path / "b", seed=5, r=2)
    with pytest.raises(ValueError, match=r"adapter 'b' target '.*q_proj' has shape \(out=48, in=48\) but adapter 'a' has \(out=32, in=32\)"):
        load_collection([tmp_path / "a", tmp_path / "b"])


def test_collection_warns_on_different_base_models(good_adapter, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(good_adapter, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "someone/else"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        col = load_collection([good_adapter, other])
    assert len(col) == 2
    assert any("different base models" in str(w.message) for w in caught)


def test_collection_unions_targets_with_zero_fill(tiny_llama_dir, tmp_path):
    make_peft_adapter(tiny_llama_dir, tmp_path / "qv", seed=6, r=2)
    make_peft_adapter(tiny_llama_dir, tmp_path / "qkv", seed=7, r=3, target_modules=["q_proj", "k_proj", "v_proj"])
    col = load_collection([tmp_path])
    assert col.names == ["qkv", "qv"]
    assert len(col.targets) == 6
    k_target = next(s.name for s in col.targets if s.name.endswith("0.self_attn.k_proj"))
    A, B = col.factors(k_target)
    assert A.shape == (2, 3, 32) and B.shape == (2, 16, 3)
    assert (B[1] @ A[1]).abs().max() == 0  # "qv" does not adapt k_proj
    torch.testing.assert_close(B[0] @ A[0], col.adapters[0].delta(k_target))


def test_find_adapter_dirs(good_adapter, tmp_path):
    assert find_adapter_dirs([str(good_adapter)]) == [good_adapter]
    assert find_adapter_dirs([str(tmp_path)]) == [good_adapter]
    assert find_adapter_dirs([str(tmp_path / "go*")]) == [good_adapter]
    with pytest.raises(ValueError, match="not found"):
        find_adapter_dirs([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="no PEFT adapter directories match"):
        find_adapter_dirs([str(tmp_path / "zz*")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains none"):
        find_adapter_dirs([str(empty)])


def test_repeated_directory_names_get_their_relative_paths(good_adapter, tmp_path):
    for run in ("run1", "run2"):
        shutil.copytree(good_adapter, tmp_path / "runs" / run / "adapter")
    col = load_collection([str(tmp_path / "runs" / "*" / "adapter")])
    assert col.names == ["run1/adapter", "run2/adapter"]


def test_duplicate_names_rejected(good_adapter):
    a = load_adapter(good_adapter)
    with pytest.raises(ValueError, match="named 'good'"):
        Collection([a, a])


# ---------------------------------------------------------- values that overflow, configs that lie


def _set_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _fill_lora_B(adapter_dir, value):
    from safetensors.torch import load_file

    f = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key].fill_(value)
    save_file(tensors, str(f))


@pytest.mark.parametrize("value, alpha", [(1e38, 8), (1e38, 2), (1e20, 2)], ids=["inf-after-scaling", "product-overflows", "squares-overflow"])
def test_weights_that_overflow_once_scaled_or_multiplied_are_refused(good_adapter, value, alpha):
    # r = 2: alpha 8 scales lora_B by 4 (1e38 -> inf in float32), alpha 2 by 1 (finite, but ΔW = B A is not).
    _set_config(good_adapter, lora_alpha=alpha)
    _fill_lora_B(good_adapter, value)
    with pytest.raises(ValueError, match=r"target '.*': .*could overflow float32; each norm and their product must be at most"):
        load_adapter(good_adapter)


def test_float16_adapters_are_bounded_by_the_float16_range(tmp_path):
    target = "base_model.model.model.layers.0.self_attn.q_proj"
    A, B = {target: torch.full((2, 8), 16.0)}, {target: torch.full((8, 2), 16.0)}  # |ΔW_ij| = 512: fits float16
    save_adapter(tmp_path / "ok", A, B, {"target_modules": ["q_proj"]}, dtype=torch.float16)
    assert load_adapter(tmp_path / "ok").delta(target).abs().max() == 512
    B = {target: torch.full((8, 2), 4000.0)}  # finite in float16, but ΔW_ij = 128000 > 65504
    save_adapter(tmp_path / "big", A, B, {"target_modules": ["q_proj"]}, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"could overflow float16; .* at most 6.55e\+04"):
        load_adapter(tmp_path / "big")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lora_alpha": 1e308}, r"lora_alpha must be a number in \(0, 1e\+06\]; got 1e\+308"),
        ({"lora_alpha": float("inf")}, r"lora_alpha must be a number .*; got inf"),
        ({"lora_alpha": float("nan")}, r"lora_alpha must be a number .*; got nan"),
        ({"lora_alpha": 0}, r"lora_alpha must be a number .*; got 0"),
        ({"lora_alpha": -16}, r"lora_alpha must be a number .*; got -16"),
        ({"lora_alpha": "16"}, r"lora_alpha must be a number .*; got '16'"),
        ({"r": 0}, r"r must be an integer in \[1, 65536\]; got 0"),
        ({"r": -2}, r"r must be an integer .*; got -2"),
        ({"r": 2.5}, r"r must be an integer .*; got 2.5"),
        ({"r": True}, r"r must be an integer .*; got True"),
        ({"r": 10**12}, r"r must be an integer .*; got 1000000000000"),
        ({"alpha_pattern": {"v_proj": float("inf")}}, r"alpha_pattern\['v_proj'\] must be a number .*; got inf"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be an integer .*; got 0"),
        ({"rank_pattern": ["q_proj"]}, r"rank_pattern must be an object"),
        ({"alpha_pattern": {"(": 4}}, r"alpha_pattern key '\(' is not a valid regular expression"),
        ({"use_rslora": "yes"}, r"use_rslora must be true or false; got 'yes'"),
        ({"alora_invocation_tokens": ["5"]}, r"alora_invocation_tokens must be a list of token ids"),
        ({"target_modules": 7}, r"target_modules must be a string or a list of strings; got 7"),
    ],
)
def test_config_values_are_checked(good_adapter, changes, message):
    _set_config(good_adapter, **changes)
    with pytest.raises(ValueError, match=r"adapter_config\.json: " + message):
        load_adapter(good_adapter)


def test_config_rank_must_match_the_tensors(good_adapter, tmp_path):
    _set_config(good_adapter, r=3)  # the tensors have rank 2
    with pytest.raises(ValueError, match=r"target '.*' has rank 2 \(lora_A \(2, 32\), lora_B \(.*, 2\)\) but adapter_config\.json gives it r = 3"):
        load_adapter(good_adapter)
    _set_config(good_adapter, r=2, rank_pattern={"q_proj": 4})
    with pytest.raises(ValueError, match=r"q_proj' has rank 2 .* gives it rank_pattern = 4"):
        load_adapter(good_adapter)
    cfg = json.loads((good_adapter / "adapter_config.json").read_text())
    del cfg["r"], cfg["rank_pattern"]
    (good_adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gives it r \(peft's default\) = 8"):
        load_adapter(good_adapter)


def test_rank_pattern_that_matches_the_tensors_loads(tiny_llama_dir, tmp_path):
    make_peft_adapter(tiny_llama_dir, tmp_path / "rp", seed=8, r=2, rank_pattern={"q_proj": 5})
    adapter = load_adapter(tmp_path / "rp")
    assert {a.shape[0] for s, a in adapter.lora_A.items() if s.endswith("q_proj")} == {5}


def test_config_file_is_bounded_and_an_object(good_adapter):
    cfg_path = good_adapter / "adapter_config.json"
    cfg_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        load_adapter(good_adapter)
    cfg_path.write_text("[" * 100_000)  # nesting deeper than the parser's recursion limit
    with pytest.raises(ValueError, match="invalid JSON"):
        load_adapter(good_adapter)
    with open(cfg_path, "wb") as f:  # 64 MiB, sparse: refused from its size, never read
        f.truncate(64 << 20)
    with pytest.raises(ValueError, match=r"67108864 bytes; an adapter_config\.json may have at most 1048576 \(1 MiB\)"):
        load_adapter(good_adapter)


def test_the_same_directory_twice_is_refused(good_adapter, tmp_path):
    with pytest.raises(ValueError, match=r"good is given twice"):
        load_collection([good_adapter, tmp_path / "." / "good"])
    shutil.copytree(good_adapter, good_adapter / "good")  # an adapter directory inside one of the same name
    with pytest.raises(ValueError, match=r"two adapters are named 'good'"):
        load_collection([good_adapter, good_adapter / "good"])
