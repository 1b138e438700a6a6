"""Model configuration read from a Hugging Face checkpoint's `config.json`.

Covers the Llama family of decoders (Llama 2/3, Mistral, Qwen2): GQA, RoPE (default, linear and
llama3 scaling), RMSNorm, SwiGLU, optional attention/MLP biases, tied embeddings, sliding windows.
Both the transformers 4 layout (`rope_theta` + `rope_scaling`) and the 5 layout
(`rope_parameters`) are read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """The shape and numerics of one decoder-only model."""

    model_type: str
    """`llama`, `mistral` or `qwen2`"""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF rope parameters beyond the base frequency (`rope_type`, `factor`, ...)"""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """bias on q/k/v projections (Qwen2 always; Llama with `attention_bias`)"""
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    """per layer: attend to at most this many previous positions (None = full attention)"""
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    """config.json's, and with `from_dir` also generation_config.json's"""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one linear module by its HF name (`q_proj`, ...)."""
        shapes = {
            "q_proj": (self.hidden_size, self.q_size),
            "k_proj": (self.hidden_size, self.kv_size),
            "v_proj": (self.hidden_size, self.kv_size),
            "o_proj": (self.q_size, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise ValueError(f"unknown module {module!r}; adaptable modules are {sorted(shapes)}")
        return shapes[module]

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or []
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures {archs}); "
                f"kilolora serves {', '.join(SUPPORTED_MODEL_TYPES)} decoders "
                "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU) is served")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = rope or dict(hf.get("rope_scaling") or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        num_layers = hf["num_hidden_layers"]
        windows = _sliding_windows(hf, model_type, num_layers)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**scaling, "rope_type": rope_type},
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_windows=windows,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: no config.json")
        config = cls.from_hf(json.loads(cfg_file.read_text()))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            # transformers' generate stops at generation_config's EOS ids, which may list more than
            # config.json's (chat models often add their end-of-turn token there).
            config.eos_token_id = _union_ids(config.eos_token_id, json.loads(gen_file.read_text()).get("eos_token_id"))
        return config

    def inv_freq(self):
        """RoPE inverse frequencies (head_dim/2,), float64, with the configured scaling applied."""
        import torch

        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        s = self.rope_scaling
        if s is None:
            return inv
        if s["rope_type"] == "linear":
            return inv / float(s["factor"])
        # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)


def _sliding_windows(hf: dict, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * num_layers
    types = hf.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if model_type == "qwen2":
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window,) * num_layers


def _union_ids(*ids: int | list[int] | None) -> int | list[int] | None:
    """The token ids of several `eos_token_id` fields, each an id, a list or None; in order, once each."""
    out: list[int] = []
    for x in ids:
        for t in x if isinstance(x, list) else [] if x is None else [x]:
            if t not in out:
                out.append(t)
    return out[0] if len(out) == 1 else out or None
