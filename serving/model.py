"""A compact Llama-family forward over a paged KV cache (gpt-fast style), with LoRA hooks.

One `forward` computes a packed batch: the new tokens of many sequences at once (prefill chunks
and single decode tokens together), each writing its keys/values into the block cache and
attending over its own cached context. Linear layers are fused (q|k|v and gate|up) and each fused
output is handed to a LoRA hook that adds every token's own adapter delta in place, so the model
knows nothing about adapters. Numerics follow `transformers`' Llama/Mistral/Qwen2 modules
(fp32 RMSNorm, HF rotate-half RoPE, fp32 logits).

Two paths compute the inference forward. The reference path (`_decoder`) is plain torch, one
op per step of the math as transformers writes it; training runs it too. On CPU in float32 or
bfloat16 the packed path (`PackedWeights`, on by default) runs the same math with the linear
weights packed ahead of time for oneDNN (the layout its GEMM kernels read, as vLLM's CPU backend
and inductor's freezing do), the residual adds fused into the GEMMs as post-ops, RMSNorm and
RoPE in fewer ops. The parity tests (tests/serving/test_packed.py) run both against transformers /
peft and against each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .config import ModelConfig

FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}
"""fused linear -> the HF modules it concatenates along the output dimension, in order"""
FUSED_WEIGHTS = {"qkv": ("wqkv", "bqkv"), "o": ("wo", "bo"), "gate_up": ("w_gate_up", "b_gate_up"),
                 "down": ("w_down", "b_down")}
"""fused linear -> its weight and bias in `LayerWeights`"""


class LoraHook(Protocol):
    """Adds each token's adapter delta to a fused linear output `y`, in place, and only adds: the
    packed path hands it `y` with the residual already summed in (o and down). `extra` holds the
    outputs an adapter registry appended to the weight (`Transformer.add_extra_outputs`, e.g. a
    shared basis `x V` computed by the same GEMM), or None when it appended none."""

    def __call__(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor,
                 extra: torch.Tensor | None) -> None: ...


@dataclass
class AttnGroup:
    """Sequences whose queries are attended together (same query length)."""

    q_rows: torch.Tensor
    """(B, Q) rows of the packed batch holding each sequence's queries"""
    key_slots: torch.Tensor
    """(B, L) cache slot of each key position (padding points at slot 0 and is masked)"""
    masks: dict[int | None, torch.Tensor]
    """sliding window -> (B, 1, Q, L) bool, True where a query may attend"""
    covers_all: bool = False
    """q_rows is exactly arange(N): the output needs no scatter"""
    lengths: torch.Tensor | None = None
    """(B, Q) int64 keys each query attends (its position + 1; (B,) for a decode group, Q = 1):
    the packed path's decode-attention kernel reads keys by `key_slots[:, :lengths]`, not the masks"""


@dataclass
class ForwardBatch:
    """Everything one forward needs besides the weights and the cache."""

    tokens: torch.Tensor
    """(N,) token ids"""
    positions: torch.Tensor
    """(N,) position of each token in its sequence"""
    slot_mapping: torch.Tensor
    """(N,) cache slot where each token's key/value is written"""
    groups: list[AttnGroup] = field(default_factory=list)
    keep: torch.Tensor | None = None
    """(M,) the rows whose hidden states the caller reads, None: all. The last layer then writes
    every row's keys and values and computes the rest (attention, o, the MLP) for these only, and
    `forward` returns (M, D): a prefill chunk's other tokens only feed the keys of the layers"""
    keep_groups: list[AttnGroup] = field(default_factory=list)
    """the last layer's attention of the kept rows (their rows of `keep`'s order)"""


class KVCache:
    """Keys and values of every layer in `num_blocks * block_size` slots."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (config.num_layers, num_blocks * block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (layers, slots, Hkv, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class LayerWeights:
    ln_attn: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln_mlp: torch.Tensor
    w_gate_up: torch.Tensor
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    extra: dict[str, int] = field(default_factory=dict)
    """fused linear -> rows its weight holds beyond the base outputs (`Transformer.add_extra_outputs`)"""


class Transformer:
    """Weights plus the forward; built by `load_model`."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor):
        self.config = config
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.dtype, self.device = embed.dtype, embed.device
        self.inv_freq = config.inv_freq().float().to(self.device)
        self._cos = self._sin = torch.empty(0, config.head_dim // 2, device=self.device)
        self.packed: PackedWeights | None = None
        """the packed path's weights (`use_packed`); None: the reference path"""

    def use_packed(self, on: bool | None = None) -> bool:
        """Switch the packed path on or off (None: on where it is supported: CPU, float32 or
        bfloat16, torch built with oneDNN). Packing keeps the plain weights, which the reference
        path, training and `add_extra_outputs` read: the linear weights' memory doubles. Returns
        whether the packed path is now on."""
        supported = PackedWeights.supported(self.dtype, self.device)
        if on and not supported:
            raise ValueError(f"the packed path needs a CPU, float32 or bfloat16 and torch with oneDNN; "
                             f"this model is {self.dtype} on {self.device}")
        self.packed = PackedWeights(self) if (supported if on is None else on) else None
        return self.packed is not None

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self._cos.shape[0]:
            n = max(need, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, device=self.device, dtype=torch.float32), self.inv_freq)
            self._cos, self._sin = freqs.cos(), freqs.sin()  # (n, hd/2) fp32, like HF
        return (self._cos.index_select(0, positions).to(self.dtype),
                self._sin.index_select(0, positions).to(self.dtype))  # (N, hd/2)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)).to(x.dtype)

    def add_extra_outputs(self, layer: int, group: str, weight: torch.Tensor) -> int:
        """Append `weight` (R, d_in) to a fused linear as R output rows beyond the base outputs (and
        R zeros to its bias): one GEMM then also yields `x @ weight.T`, which the forward hands to
        the LoRA hook as `extra` instead of adding it to the model's activations. An adapter
        registry folds a shared basis in this way; calls accumulate. Returns the bytes added."""
        if group not in FUSED_WEIGHTS:
            raise ValueError(f"group must be one of {sorted(FUSED_WEIGHTS)}, got {group!r}")
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer must be in [0, {len(self.layers)}), got {layer!r}")
        lw = self.layers[layer]
        w_name, b_name = FUSED_WEIGHTS[group]
        w, b = getattr(lw, w_name), getattr(lw, b_name)
        if weight.dim() != 2 or weight.shape[1] != w.shape[1]:
            raise ValueError(f"extra outputs of {group!r} need shape (R, {w.shape[1]}), got {tuple(weight.shape)}")
        weight = weight.to(w.device, w.dtype)
        setattr(lw, w_name, torch.cat([w, weight]).contiguous())
        added = weight.numel() * weight.element_size()
        if b is not None:
            setattr(lw, b_name, torch.cat([b, b.new_zeros(weight.shape[0])]))
            added += weight.shape[0] * b.element_size()
        lw.extra[group] = lw.extra.get(group, 0) + weight.shape[0]
        if self.packed is not None:
            self.packed.repack(layer, group)
        return added

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, cache: KVCache, lora: LoraHook | None = None) -> torch.Tensor:
        """Hidden states after the final norm, (N, hidden), or of the rows `batch.keep` names
        (M, hidden); keys/values of every row are written to `cache`."""
        cos, sin = self._rope_tables(batch.positions)
        last = len(self.layers) - 1
        keep = None
        if batch.keep is not None and (lora is None or hasattr(lora, "rows")):
            keep = (batch.keep, lora.rows(batch.keep) if lora is not None else None)

        def attend(layer, q, k, v):  # (N or M, H, hd), (N, Hkv, hd), (N, Hkv, hd); k, v None: written
            if k is not None:
                cache.k[layer].index_copy_(0, batch.slot_mapping, k)
                cache.v[layer].index_copy_(0, batch.slot_mapping, v)
            groups = batch.keep_groups if keep is not None and layer == last else batch.groups
            return self._attention(layer, q, groups, cache)  # (N or M, H*hd)

        h = self.embed.index_select(0, batch.tokens)
        if self.packed is not None:
            cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]  # (N, 1, hd)
            c, cos2, sin2 = self.config, cos[:, 0], sin[:, 0]  # (N, hd)

            def rope_kv(layer, qkv):  # q rotated (N, H, hd); k rotated and v into the cache
                return cpu_kernels.rope_kv(qkv, cos2, sin2, c.num_heads, c.num_kv_heads, cache.k[layer],
                                           cache.v[layer], batch.slot_mapping)
            h = self._decoder_packed(h, cos, sin, attend, lora, self.packed, keep,
                                     rope_kv if self.packed.kernels else None)
        else:
            cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]  # (N, 1, hd)
            h = self._decoder(h, cos, sin, attend, lora, keep)
        if batch.keep is not None and keep is None:  # a hook that cannot narrow to rows: all were computed
            h = h.index_select(0, batch.keep)
        return h  # (N or M, D)

    def forward_train(self, tokens: torch.Tensor, lora: LoraHook | None = None) -> torch.Tensor:
        """Hidden states of right-padded sequences `tokens` (B, T) with full causal attention and no
        cache, differentiable w.r.t. whatever `lora` adds (the trainer's adapters; base weights are
        plain tensors). The hook gets (B, T, ·) activations; `extra` is as in `forward`."""
        c = self.config
        b, t = tokens.shape
        if any(w is not None for w in c.sliding_windows):
            raise ValueError("forward_train does not implement sliding-window attention")
        cos, sin = self._rope_tables(torch.arange(t, device=self.device))
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]  # (T, 1, hd)

        def attend(layer, q, k, v):  # (B, T, H, hd), (B, T, Hkv, hd), (B, T, Hkv, hd)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)  # (B, H, T, hd)
            return a.transpose(1, 2).reshape(b, t, c.q_size)  # (B, T, H*hd)

        return self._decoder(self.embed[tokens], cos, sin, attend, lora)  # (B, T, D)

    def forward_train_from(self, prefix: torch.Tensor, prefix_len: torch.Tensor, suffix: torch.Tensor,
                           lora: LoraHook | None = None) -> torch.Tensor:
        """Hidden states (B, S, D) of each sequence's suffix after its prefix, differentiable w.r.t.
        what `lora` adds to the suffix only: what `forward_train` computes at those positions for an
        activated adapter covering exactly the suffix, without its backward through the prefix.
        The prefix (B, P), right-padded to `prefix_len` (B,), runs once with the base alone and no
        graph (its keys and values are all the suffix reads); `suffix` (B, S) is right-padded."""
        c = self.config
        b, p = prefix.shape
        s = suffix.shape[1]
        if any(w is not None for w in c.sliding_windows):
            raise ValueError("forward_train_from does not implement sliding-window attention")
        if not (prefix_len.min() >= 1 and prefix_len.max() <= p):
            raise ValueError(f"prefix lengths must be in 1..{p}, got {prefix_len.tolist()}")
        cos, sin = self._rope_tables(torch.arange(p, device=self.device))
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]  # (P, 1, hd)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(layer, q, k, v):  # the prefix: causal, as forward_train; right padding is never read
            kv.append((k, v))
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
            return a.transpose(1, 2).reshape(b, p, c.q_size)

        with torch.no_grad():
            self._decoder(self.embed[prefix], cos, sin, capture, None)
        dev = self.device
        pos = prefix_len.to(dev)[:, None] + torch.arange(s, device=dev)[None, :]  # (B, S)
        cs, sn = self._rope_tables(pos.flatten())
        cs = torch.cat([cs, cs], -1).view(b, s, 1, -1)
        sn = torch.cat([sn, sn], -1).view(b, s, 1, -1)  # (B, S, 1, hd)
        own = (torch.arange(p, device=dev)[None, :] < prefix_len.to(dev)[:, None])[:, None, None, :]  # (B,1,1,P)
        causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril()[None, None]  # (1, 1, S, S)
        mask = torch.cat([own.expand(b, 1, s, p), causal.expand(b, 1, s, s)], -1)  # (B, 1, S, P + S)

        def attend(layer, q, k, v):  # the suffix's queries over its prefix's keys and its own, causally
            kp, vp = kv[layer]
            keys, values = torch.cat([kp, k], 1), torch.cat([vp, v], 1)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                               attn_mask=mask, enable_gqa=True)
            return a.transpose(1, 2).reshape(b, s, c.q_size)

        return self._decoder(self.embed[suffix], cs, sn, attend, lora)  # (B, S, D)

    def _decoder(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
                 lora: LoraHook | None, keep: tuple[torch.Tensor, LoraHook | None] | None = None) -> torch.Tensor:
        """The decoder layers and the final norm over hidden states h (..., D), the one loop both
        forwards share; `attend(layer, q, k, v)` -> (..., H*hd) is where they differ. `keep`
        (rows (M,), their hook): the last layer past its keys and values for those rows only."""
        c = self.config
        for hook in (lora, keep[1] if keep is not None else None):
            if hasattr(hook, "cpu_kernels"):
                hook.cpu_kernels = False  # the reference path: torch's ops
        last = len(self.layers) - 1
        for i, lw in enumerate(self.layers):
            x = self._rms(h, lw.ln_attn)
            qkv = _adapted(lora, i, "qkv", x, lw.wqkv, lw.bqkv, lw.extra.get("qkv", 0))  # (..., q + 2kv)
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = _rotate(q.unflatten(-1, (c.num_heads, c.head_dim)), cos, sin)  # (..., H, hd)
            k = _rotate(k.unflatten(-1, (c.num_kv_heads, c.head_dim)), cos, sin)  # (..., Hkv, hd)
            if keep is not None and i == last:
                q = q.index_select(0, keep[0])  # (M, H, hd)
            a = attend(i, q, k, v.unflatten(-1, (c.num_kv_heads, c.head_dim)))  # (..., H*hd)
            if keep is not None and i == last:
                if not keep[0].numel():
                    return h[:0]
                h, lora = h.index_select(0, keep[0]), keep[1]
            h = h + _adapted(lora, i, "o", a, lw.wo, lw.bo, lw.extra.get("o", 0))
            x = self._rms(h, lw.ln_mlp)
            gu = _adapted(lora, i, "gate_up", x, lw.w_gate_up, lw.b_gate_up, lw.extra.get("gate_up", 0))  # (..., 2I)
            gate, up = gu.chunk(2, dim=-1)
            h = h + _adapted(lora, i, "down", F.silu(gate) * up, lw.w_down, lw.b_down, lw.extra.get("down", 0))
        return self._rms(h, self.norm)

    def _decoder_packed(self, h: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, attend,
                        lora: LoraHook | None, packed: PackedWeights,
                        keep: tuple[torch.Tensor, LoraHook | None] | None = None, rope_kv=None) -> torch.Tensor:
        """`_decoder`'s math on the packed path (inference only, no autograd through it): q and k
        rotated in one pass (`sin_signed` = [-sin, sin] folds rotate-half's negation; `rope_kv(layer,
        qkv)` -> q, where given, rotates them and writes k and v to the cache in one kernel), residual
        adds in the o / down GEMMs. A token's base outputs are the same bits whether or not an
        adapter is in its batch (SwiGLU as gate / up's post-ops would not be: oneDNN's swish
        rounds differently from torch's silu, so it is not fused)."""
        c = self.config
        nq, nqk = c.num_heads, c.num_heads + c.num_kv_heads
        for hook in (lora, keep[1] if keep is not None else None):
            if hasattr(hook, "cpu_kernels"):  # a LoraBatch: its folded bank's work in one kernel a group
                hook.cpu_kernels = packed.kernels
        last = len(self.layers) - 1
        for i, lw in enumerate(self.layers):
            x = self._rms_packed(h, lw.ln_attn)
            qkv = packed.linear(i, "qkv", x, lora)  # (N, q + 2kv)
            if rope_kv is not None:
                q, k, v = rope_kv(i, qkv), None, None  # (N, H, hd); k, v in the cache
            else:
                qk = qkv[:, :c.q_size + c.kv_size].unflatten(-1, (nqk, c.head_dim))  # (N, H + Hkv, hd) view
                x1, x2 = qk.chunk(2, dim=-1)
                qk = torch.addcmul(qk * cos, torch.cat([x2, x1], dim=-1), sin_signed)
                q, k = qk[:, :nq], qk[:, nq:]
                v = qkv[:, c.q_size + c.kv_size:].unflatten(-1, (c.num_kv_heads, c.head_dim))
            if keep is not None and i == last:
                q = q.index_select(0, keep[0])  # (M, H, hd)
            a = attend(i, q, k, v)  # (N or M, H*hd)
            if keep is not None and i == last:
                if not keep[0].numel():
                    return h[:0]
                h, lora = h.index_select(0, keep[0]), keep[1]
            h = packed.linear(i, "o", a, lora, residual=h)
            x = self._rms_packed(h, lw.ln_mlp)
            gu = packed.linear(i, "gate_up", x, lora)
            if packed.kernels:
                act = cpu_kernels.silu_mul(gu)
            else:
                gate, up = gu.chunk(2, dim=-1)
                act = F.silu(gate) * up
            h = packed.linear(i, "down", act, lora, residual=h)
        return self._rms_packed(h, self.norm)

    def _rms_packed(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # `_rms` in one pass (`cpu_kernels.rms_norm`), else in one op (float32) or three (the
        # normalisation in float32, then cast and scaled as transformers does) instead of eight
        if self.packed is not None and self.packed.kernels and x.dim() == 2:
            return cpu_kernels.rms_norm(x, w, self.config.rms_norm_eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.config.rms_norm_eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.config.rms_norm_eps).to(x.dtype) * w

    def _attention(self, layer: int, q: torch.Tensor, groups: list[AttnGroup], cache: KVCache) -> torch.Tensor:
        c = self.config
        window = c.sliding_windows[layer]
        if not groups:  # no query (a step whose rows are all a prefill's middle)
            return q.new_empty(q.shape[0], c.q_size)
        out = None
        for g in groups:
            b, nq = g.q_rows.shape
            qg = q if g.covers_all else q.index_select(0, g.q_rows.view(-1))  # (B*Q, H, hd)
            if (nq <= PackedWeights.KERNEL_MAX_Q and g.lengths is not None and self.packed is not None
                    and self.packed.decode_kernel):
                # keys and values read where the cache holds them (`cpu_kernels`): no gather; a short
                # chunk (a verifier scoring a few tokens over a cached prefix) as one row per query
                slots = g.key_slots if nq == 1 else g.key_slots.repeat_interleave(nq, dim=0)
                og = cpu_kernels.decode_attention(qg, cache.k[layer], cache.v[layer], slots, g.lengths.reshape(-1),
                                                  window)
                if g.covers_all:
                    return og
                if out is None:
                    out = q.new_empty(q.shape[0], c.q_size)
                out[g.q_rows.reshape(-1)] = og
                continue
            # index_select, not advanced indexing: ~6x faster gathers on CPU (54 vs 345 us, B=64, L=64).
            slots = g.key_slots.reshape(-1)
            kg = cache.k[layer].index_select(0, slots).view(b, -1, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
            vg = cache.v[layer].index_select(0, slots).view(b, -1, c.num_kv_heads, c.head_dim).transpose(1, 2)
            if nq == 1:
                # decode: the H / Hkv query heads sharing a key head are attended as that head's
                # queries, one (B, Hkv, H/Hkv, L) product with no repeated keys: the same values
                # as GQA's, ~2x faster on CPU (B = 16, L = 64: 81 vs 182 us)
                qg = qg.view(b, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.masks[window])  # (B, Hkv, G, hd)
                og = og.reshape(b, c.q_size)
            else:
                qg = qg.view(b, nq, c.num_heads, c.head_dim).transpose(1, 2)  # (B, H, Q, hd)
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.masks[window], enable_gqa=True)
                og = og.transpose(1, 2).reshape(b * nq, c.q_size)  # (B*Q, H*hd)
            if g.covers_all:
                return og
            if out is None:
                out = q.new_empty(q.shape[0], c.q_size)
            out[g.q_rows.reshape(-1)] = og
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, vocab) float32 logits of final hidden states."""
        if self.packed is not None and not hidden.requires_grad:
            return self.packed.head(hidden).float()
        return (hidden @ self.lm_head.T).float()


_MKLDNN = getattr(torch.ops, "mkldnn", None)


def _amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


MKL_SLOW = _amd_cpu()
"""MKL's float32 GEMMs run its generic code here (an AMD CPU): `PackedWeights` packs more"""


class PackedWeights:
    """A `Transformer`'s linear weights packed for oneDNN's GEMM (`torch.ops.mkldnn`), beside the
    plain ones, each fused group with the rows an adapter registry appended (`add_extra_outputs`)
    in the same pack: one GEMM per group. In float32 oneDNN beats MKL only on middling shapes
    (measured on SmolLM2-135M, 2 cores: 43 vs 55 ms of GEMMs a step at 16 rows, even at 64, slower
    at 1, and slower at every batch on the embedded world's hidden 256): float32 GEMMs run packed
    for `FP32_ROWS` rows and `FP32_MIN_HIDDEN` up, else on the plain weights through MKL, the
    residual then summed in by `addmm`."""

    FP32_ROWS = (8, 48)
    FP32_MIN_HIDDEN = 512
    FP32_AMD_MIN_WEIGHT = 1 << 18
    """on AMD CPUs MKL takes a generic code path (float32 GEMMs 1.3-2.8x slower than oneDNN's on
    SmolLM2's shapes on a 2-core EPYC, at every row count): there float32 weights of this many
    elements up run packed at every row count, smaller ones on MKL (the embedded world's o and head
    projections, where MKL still wins)"""
    KERNEL_MAX_Q = 8
    """chunks of up to this many queries attend through the decode-attention kernel (longer
    prefills through SDPA: its blocked GEMMs win when many queries share the keys)"""
    BATCH_HINT = 16
    """the rows the packed layout is tuned for (any count is computed correctly)"""

    @staticmethod
    def supported(dtype: torch.dtype, device: torch.device) -> bool:
        return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and torch.backends.mkldnn.is_available() and hasattr(_MKLDNN, "_linear_pointwise"))

    def __init__(self, model: Transformer):
        self.model = model
        fp32 = model.dtype == torch.float32
        self.min_weight = self.FP32_AMD_MIN_WEIGHT if fp32 and MKL_SLOW else 0
        """smaller weights are not packed (their GEMMs take the plain weights)"""
        self.rows = self.FP32_ROWS if fp32 and not MKL_SLOW else (1, 1 << 62)
        """the row counts whose GEMMs run packed"""
        self.packs = not fp32 or MKL_SLOW or model.config.hidden_size >= self.FP32_MIN_HIDDEN
        """False: no weight is packed (every GEMM takes the plain weights)"""
        self._groups: dict[tuple[int, str], tuple] = {}
        self._last_wide: torch.Tensor | None = None
        """the last o / down output with extra columns, as [y | 0] (`_wide`)"""
        self.kernels = cpu_kernels.available()
        self.own = (self.kernels and model.dtype == torch.bfloat16 and os.environ.get("KILOLORA_BF16_GEMM", "1") != "0"
                    and cpu_kernels.has_gemm_bf16())
        """bfloat16 GEMMs of up to `OWN_ROWS` rows through `cpu_kernels.Bf16Linear` (else oneDNN's)"""
        self._own: dict[tuple[int, str], cpu_kernels.Bf16Linear | None] = {}
        for layer in range(len(model.layers)):
            for group in FUSED_WEIGHTS:
                self.repack(layer, group)
        self._head = self._pack(model.lm_head)
        self._own_head = self._own_pack(model.lm_head)
        c = model.config
        """RMSNorm and silu * up through `cpu_kernels` (else torch's ops)"""
        self.decode_kernel = self.kernels and c.head_dim <= 256 and c.num_heads // c.num_kv_heads <= 16
        """decode attention through `cpu_kernels.decode_attention` (else SDPA on gathered keys)"""

    def _pack(self, w: torch.Tensor) -> torch.Tensor | None:
        if not self.packs or w.numel() < self.min_weight:
            return None
        return _MKLDNN._reorder_linear_weight(w.contiguous(), batch_size=self.BATCH_HINT)

    def _packed(self, rows: int) -> bool:
        return self.packs and self.rows[0] <= rows <= self.rows[1]

    def repack(self, layer: int, group: str) -> None:
        """(Re)build one fused group's pack from its plain weight; extra outputs on a base width that
        is a multiple of `PAD_TO` are padded to the next multiple with zero rows (`PAD_TO`)."""
        lw = self.model.layers[layer]
        w_name, b_name = FUSED_WEIGHTS[group]
        w, b = getattr(lw, w_name), getattr(lw, b_name)
        extra = lw.extra.get(group, 0)
        out = w.shape[0] - extra
        pad = -w.shape[0] % self.PAD_TO if extra and out % self.PAD_TO == 0 else 0
        wp = self._pack(torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w)
        bp = b if b is None or not pad or wp is None else torch.cat([b, b.new_zeros(pad)])
        self._groups[(layer, group)] = (wp, bp if wp is not None else b, w, out, extra)
        self._own[(layer, group)] = self._own_pack(w)

    OWN_ROWS = 48
    """GEMMs of up to this many rows run on `Bf16Linear` (bfloat16, AVX512-BF16): on SmolLM2-135M
    (2 cores, Zen 5) 23-25% faster than oneDNN's at 1-16 rows, 8-13% at 32-48, as fast at 64-128"""

    def _own_pack(self, w: torch.Tensor) -> cpu_kernels.Bf16Linear | None:
        return cpu_kernels.Bf16Linear(w) if self.own and w.shape[1] % 2 == 0 else None

    PAD_TO = 128
    """oneDNN's bfloat16 GEMMs at 64 rows ran 15-30% slower on SmolLM2's gate|up with a bank's extra
    outputs than without (3072 + 32 columns: 331 vs 277 us; 2 cores, Zen 5), and as fast padded to
    3200 (288 us); widths off a multiple of 128 to begin with (q|k|v 960 -> 1008, o 576 -> 592) ran
    no slower"""

    def linear(self, layer: int, group: str, x: torch.Tensor, lora: LoraHook | None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """`_adapted` on the packed weights, plus `residual` if given: (N, out)."""
        wp, b, w, out, extra = self._groups[(layer, group)]
        own = self._own[(layer, group)] if x.shape[0] <= self.OWN_ROWS else None
        packed = wp is not None and self._packed(x.shape[0])
        if residual is not None and extra:
            residual = self._wide(residual, wp.size(0) if packed and own is None else w.shape[0])
        if own is not None:
            y = own(x if x.stride(1) == 1 else x.contiguous(), self._lw_bias(layer, group), residual)
            residual = None
        elif not packed:
            if residual is not None and b is None:
                y, residual = torch.addmm(residual, x, w.T), None
            else:
                y = F.linear(x, w, b)
        elif residual is not None:
            y = _MKLDNN._linear_pointwise.binary(x, residual, wp, b, "add")
            residual = None
        else:
            y = _MKLDNN._linear_pointwise(x, wp, b, "none", [], "")
        if residual is not None:
            y.add_(residual)
        e = None
        full = y
        if extra:
            y, e = full[:, :out], full[:, out:out + extra]
        if lora is not None:
            lora(layer, group, x, y, e)
        if e is not None and group in ("o", "down"):
            full[:, out:].zero_()  # `full` is [y | 0] now: the next residual add's operand as it is (`_wide`)
            self._last_wide = full
        return y

    def _wide(self, residual: torch.Tensor, width: int) -> torch.Tensor:
        """`residual` (N, d) as the left columns of an (N, width) operand whose right ones are zero:
        a group with extra outputs then sums the residual inside its GEMM as one without does, in
        one rounding (a base token's bits do not depend on whether a bank is loaded) and with no
        separate add on the strided outputs. The o / down outputs of the last call already are one
        (their extra columns zeroed once the hook read them): only the first layer's is a copy."""
        n, d = residual.shape
        last = self._last_wide
        if (last is not None and last.shape == (n, width) and residual.data_ptr() == last.data_ptr()
                and residual.stride() == last.stride() and last.dtype == residual.dtype):
            return last
        wide = residual.new_zeros(n, width)
        wide[:, :d] = residual
        return wide

    def _lw_bias(self, layer: int, group: str) -> torch.Tensor | None:
        return getattr(self.model.layers[layer], FUSED_WEIGHTS[group][1])

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._own_head is not None and hidden.shape[0] <= self.OWN_ROWS:
            return self._own_head(hidden if hidden.stride(1) == 1 else hidden.contiguous())
        if self._head is None or not self._packed(hidden.shape[0]):
            return hidden @ self.model.lm_head.T
        return _MKLDNN._linear_pointwise(hidden, self._head, None, "none", [], "")


def _adapted(lora: LoraHook | None, layer: int, group: str, x: torch.Tensor, w: torch.Tensor,
             b: torch.Tensor | None, extra: int) -> torch.Tensor:
    """x @ w.T (+ b), then each token's adapter delta; the last `extra` rows of w are extra outputs."""
    y = F.linear(x, w, b)  # (..., out + extra)
    e = None
    if extra:
        y, e = y[..., :-extra], y[..., -extra:]
    if lora is not None:
        lora(layer, group, x, y, e)
    return y


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF convention: rotate the two halves of head_dim, not interleaved pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# --------------------------------------------------------------------------------------- loading


def _read_tensors(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found pickle files {pickles}; convert them to safetensors, they are never unpickled)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as sf:
            for key in sf.keys():
                if key in names:
                    out[key] = sf.get_tensor(key)
    return out


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Load a HF Llama/Mistral/Qwen2 checkpoint directory (safetensors only) into a `Transformer`."""
    path = Path(path)
    config = ModelConfig.from_dir(path)
    device = torch.device(device)
    dtype = dtype if dtype is not None else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")

    def layer_keys(i: int) -> dict[str, str]:
        p = f"model.layers.{i}."
        keys = {
            "ln_attn": p + "input_layernorm.weight", "ln_mlp": p + "post_attention_layernorm.weight",
            **{m: p + f"self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
            **{m: p + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")},
        }
        if config.qkv_bias:
            keys.update({m + ".bias": p + f"self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj")})
        if config.o_bias:
            keys["o_proj.bias"] = p + "self_attn.o_proj.bias"
        if config.mlp_bias:
            keys.update({m + ".bias": p + f"mlp.{m}.bias" for m in ("gate_proj", "up_proj", "down_proj")})
        return keys

    wanted = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config.num_layers):
        wanted |= set(layer_keys(i).values())
    t = _read_tensors(path, wanted)
    if "lm_head.weight" not in t:
        if not config.tie_word_embeddings:
            raise ValueError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")
        wanted.discard("lm_head.weight")
    missing = sorted(wanted - set(t))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def get(key: str) -> torch.Tensor:
        return t[key].to(device=device, dtype=dtype)

    def check(name: str, w: torch.Tensor, shape: tuple[int, ...]):
        if tuple(w.shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(w.shape)}, config.json implies {shape}")

    layers = []
    for i in range(config.num_layers):
        k = layer_keys(i)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            d_in, d_out = config.module_shape(m)
            check(k[m], t[k[m]], (d_out, d_in))
        cat = lambda names: torch.cat([get(k[n]) for n in names]).contiguous()  # noqa: E731
        layers.append(LayerWeights(
            ln_attn=get(k["ln_attn"]), ln_mlp=get(k["ln_mlp"]),
            wqkv=cat(["q_proj", "k_proj", "v_proj"]),
            bqkv=cat(["q_proj.bias", "k_proj.bias", "v_proj.bias"]) if config.qkv_bias else None,
            wo=get(k["o_proj"]), bo=get(k["o_proj.bias"]) if config.o_bias else None,
            w_gate_up=cat(["gate_proj", "up_proj"]),
            b_gate_up=cat(["gate_proj.bias", "up_proj.bias"]) if config.mlp_bias else None,
            w_down=get(k["down_proj"]), b_down=get(k["down_proj.bias"]) if config.mlp_bias else None,
        ))
    embed = get("model.embed_tokens.weight")
    check("model.embed_tokens.weight", embed, (config.vocab_size, config.hidden_size))
    lm_head = get("lm_head.weight") if "lm_head.weight" in t else embed
    return Transformer(config, embed, layers, get("model.norm.weight"), lm_head)
