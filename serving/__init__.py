"""Serving: a compact Llama-family runner over a paged KV cache, dense and bank LoRA adapters
chosen per token (Triton kernels on CUDA, torch on CPU), and the continuous-batching engine.

    from serving import Engine, SamplingParams
    engine = Engine.from_pretrained("model_dir", bank="bank_dir", adapters={"math": "lora_dir"})
    out = engine.generate(["2+2="], adapter="math", params=SamplingParams(max_tokens=8, temperature=0))
"""

from .config import ModelConfig
from .engine import Engine
from .sampling import SamplingParams, TokenLogprob
from .sequence import Completion, Counters, Delta

__all__ = ["Completion", "Counters", "Delta", "Engine", "ModelConfig", "SamplingParams", "TokenLogprob"]
