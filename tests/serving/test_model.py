"""The compact forward against `transformers` for Llama, Mistral and Qwen2 variants."""

from __future__ import annotations

import json

import pytest
import torch

from serving import Engine, SamplingParams
from serving.config import ModelConfig
from tests.helpers import make_tiny_model

VARIANTS = {
    "llama": ("llama", {}),
    "llama3-rope-bias-tied": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                            attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama-linear-rope-mha": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, num_key_value_heads=4)),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(path, arch, seed=3, **overrides)
    return path, hf


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_prefill_logits_and_greedy_match_transformers(variant):
    path, hf = variant
    engine = Engine.from_pretrained(path, kv_cache_tokens=512, block_size=8)
    torch.manual_seed(1)
    prompt = torch.randint(3, 64, (21,)).tolist()  # crosses blocks and the 8-token sliding window
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    out = engine.generate([prompt], params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref
    # Teacher-forced log-probabilities of prompt + generation equal transformers' at every position.
    seq = engine.open(prompt[:1])
    scores = torch.tensor(engine.score(seq, prompt[1:] + ref))
    lp = hf_logits(hf, prompt + ref).log_softmax(-1)
    want = lp[torch.arange(len(prompt) + len(ref) - 1), torch.tensor(prompt[1:] + ref)]
    torch.testing.assert_close(scores, want, atol=2e-5, rtol=1e-4)


def test_decode_logits_match_transformers_step_by_step(variant):
    # Decode path (one new token per forward against the paged cache) vs a full forward.
    path, hf = variant
    engine = Engine.from_pretrained(path, kv_cache_tokens=512, block_size=4)
    prompt = list(range(5, 25))
    out = engine.generate([prompt], params=SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    full = prompt + out.token_ids
    lp = hf_logits(hf, full).log_softmax(-1)
    for j, tl in enumerate(out.logprobs):
        row = lp[len(prompt) - 1 + j]
        assert tl.token == out.token_ids[j]
        assert tl.logprob == pytest.approx(row[tl.token].item(), abs=2e-5)
        top = row.topk(3)
        assert [t for t, _ in tl.top] == top.indices.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_transformers(tmp_path, dtype):
    hf = make_tiny_model(tmp_path, "llama", seed=5)
    engine = Engine.from_pretrained(tmp_path, dtype=dtype, kv_cache_tokens=256)
    prompt = list(range(3, 30))
    seq = engine.open(prompt[:1])
    scores = torch.tensor(engine.score(seq, prompt[1:]))
    lp = hf_logits(hf.to(dtype), prompt).log_softmax(-1)
    want = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(scores, want, atol=0.05, rtol=0.05)


def test_config_reads_transformers4_layout():
    cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
                               "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "linear"
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "gpt2"}, "llama, mistral, qwen2"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "silu"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "default, linear, llama3"),
])
def test_unsupported_configs_are_refused(tmp_path, bad, match):
    cfg = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, **bad}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    make_tiny_model(tmp_path, "llama", tokenizer=False)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never unpickled"):
        Engine.from_pretrained(tmp_path)


def test_extra_outputs_reach_the_hook_and_leave_the_model_unchanged(tmp_path):
    """`add_extra_outputs` appends rows to a fused weight (a registry folds a shared basis so):
    both forwards hand `x @ W.T` of those rows to the LoRA hook as `extra`, and their hidden states
    are the base model's."""
    from serving.model import AttnGroup, ForwardBatch, KVCache, load_model

    make_tiny_model(tmp_path, seed=5)
    model = load_model(tmp_path)
    engine = Engine(load_model(tmp_path), kv_cache_tokens=64, block_size=4)
    tokens = torch.tensor([[5, 9, 11, 3, 20]])
    base_train = model.forward_train(tokens)
    ids = list(range(5, 12))
    seq = engine.open(ids[:1])
    base_scores = engine.score(seq, ids[1:])
    torch.manual_seed(0)
    extra_w = {(0, "qkv"): torch.randn(3, 32), (1, "down"): torch.randn(2, 64)}
    for (layer, group), w in extra_w.items():
        for m in (model, engine.model):
            assert m.add_extra_outputs(layer, group, w) == w.numel() * 4
    seen = {}

    def hook(layer, group, x, y, extra):
        if (layer, group) in extra_w:
            seen[(layer, group)] = (x.clone(), extra.clone())
        else:
            assert extra is None

    torch.testing.assert_close(model.forward_train(tokens, hook), base_train, atol=1e-6, rtol=1e-5)
    for key, (x, extra) in seen.items():
        torch.testing.assert_close(extra, x @ extra_w[key].T, atol=1e-5, rtol=1e-5)
    assert set(seen) == set(extra_w)
    torch.testing.assert_close(torch.tensor(engine.score(seq, ids[1:])), torch.tensor(base_scores), atol=1e-6, rtol=1e-5)
    cache = KVCache(model.config, 4, 4, model.dtype, model.device)
    one = AttnGroup(torch.tensor([[0]]), torch.tensor([[0]]), {None: torch.ones(1, 1, 1, 1, dtype=torch.bool)}, True)
    seen.clear()
    model.forward(ForwardBatch(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), [one]), cache, hook)
    assert set(seen) == set(extra_w)
    with pytest.raises(ValueError, match="group"):
        model.add_extra_outputs(0, "qkvz", torch.randn(1, 32))
    with pytest.raises(ValueError, match=r"\(R, 64\)"):
        model.add_extra_outputs(0, "down", torch.randn(1, 32))
