"""Serve a base model with a compressed bank and a dense adapter in one batch, per-token adapters.

    python examples/serve_adapters.py

Makes a tiny random Llama checkpoint and 100 synthetic PEFT adapters, compresses them into a
3-cluster JD-Full bank, then: one batched greedy generate where every prompt uses a different
adapter (bank entries, an uncompressed PEFT adapter, and the base), a fork that shares its prompt,
and a score. Runs in a few seconds on a laptop CPU.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compression import CompressConfig, compress, load_collection
from compression.synthetic import PlantedSpec, write_planted
from serving import Engine, SamplingParams

with tempfile.TemporaryDirectory() as tmp:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(f"{tmp}/base")
    spec = PlantedSpec(n=100, modules=(("q_proj", 64, 64), ("v_proj", 64, 32)), layers=2, r=8, groups=3, noise=0.01,
                       lora_alpha=16)
    write_planted(f"{tmp}/adapters", spec)
    bank = compress(load_collection([f"{tmp}/adapters"]), CompressConfig(method="jd-full", rank=8, clusters=3))
    bank.save(f"{tmp}/bank")

    engine = Engine.from_pretrained(f"{tmp}/base", bank=f"{tmp}/bank",
                                    adapters={"dense_7": f"{tmp}/adapters/adapter_0007"})
    print(f"resident adapters: {len(engine.adapters)} (bank of {len(bank.entries)} + 1 dense)")

    prompt = [5, 17, 42, 9, 77, 3]
    adapters = [None, "dense_7", "adapter_0007", "adapter_0001", "adapter_0050", "adapter_0099"]
    outs = engine.generate([prompt] * len(adapters), adapter=adapters,
                           params=SamplingParams(max_tokens=8, temperature=0))
    for name, out in zip(adapters, outs):
        print(f"{name or 'base':>14}: {out.token_ids}")

    # Fork: four samples share the prompt's KV cache; only their own tokens are computed.
    root = engine.open(list(range(1, 40)))
    engine.run([root], SamplingParams(max_tokens=1))
    samples = engine.run(engine.fork(root, 4), SamplingParams(max_tokens=6, temperature=0.8, seed=1))
    print("fork x4 counters:", [s.counters.as_dict() for s in samples])

    # Score a continuation under a bank adapter (what a verifier does).
    logprobs = engine.score(root, [3, 4, 5], adapter="adapter_0042")
    print("score under adapter_0042:", [round(x, 3) for x in logprobs])
