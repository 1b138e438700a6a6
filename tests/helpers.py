"""Helpers for tests: real PEFT adapters on tiny random HF Llama models."""

from __future__ import annotations

import warnings

import torch


def load_base(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def make_peft_adapter(base_dir, out_dir, seed: int, **lora_kwargs):
    """Create a real PEFT LoRA adapter with random (non-zero) A and B and save it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    kwargs.update(lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(base_dir), LoraConfig(**kwargs)).eval()
    model.save_pretrained(out_dir)
    return model


def peft_logits(base_dir, adapter_dir, input_ids):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits
