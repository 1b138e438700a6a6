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
        slot = name  # named_modules of the PeftModel: base_model.model.model.layers.0...
        expected = layer.get_delta_weight("default").detach()
        assert expected.abs().max() > 1e-3  # non-vacuous
        torch.testing.assert_close(adapter.delta(slot), expected, rtol=1e-5, atol=1e-6)
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
    slot = next(iter(A))
    torch.testing.assert_close(back.delta(slot), B[slot] @ A[slot])
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
    with pytest.raises(ValueError, match=r"adapter 'b' slot '.*q_proj' has shape \(out=48, in=48\) but adapter 'a' has \(out=32, in=32\)"):
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


def test_collection_unions_slots_with_zero_fill(tiny_llama_dir, tmp_path):
    make_peft_adapter(tiny_llama_dir, tmp_path / "qv", seed=6, r=2)
    make_peft_adapter(tiny_llama_dir, tmp_path / "qkv", seed=7, r=3, target_modules=["q_proj", "k_proj", "v_proj"])
    col = load_collection([tmp_path])
    assert col.names == ["qkv", "qv"]
    assert len(col.slots) == 6
    k_slot = next(s.name for s in col.slots if s.name.endswith("0.self_attn.k_proj"))
    A, B = col.factors(k_slot)
    assert A.shape == (2, 3, 32) and B.shape == (2, 16, 3)
    assert (B[1] @ A[1]).abs().max() == 0  # "qv" does not adapt k_proj
    torch.testing.assert_close(B[0] @ A[0], col.adapters[0].delta(k_slot))


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
