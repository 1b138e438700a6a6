"""Planted LoRA collections: adapters that share bases per group, plus noise.

Used by the tests, the benchmark and the README's quick start. Group g has orthonormal bases
U_g (d_out×k), V_g (d_in×k) per target; adapter i of group g has
`B_i = U_g C_i + ε N_B`, `A_i = D_iᵀ V_gᵀ + ε N_A` with random k×r C_i, D_i, so its ΔW_i lies
(up to ε) in the span of U_g and V_g — the structure JD recovers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .peft_io import save_adapter


@dataclass
class PlantedSpec:
    """Shape of a planted collection."""

    n: int = 100
    """number of adapters"""
    modules: tuple[tuple[str, int, int], ...] = (("q_proj", 64, 64), ("v_proj", 64, 32))
    """(module, in_features, out_features) of the targets in every layer"""
    layers: int = 2
    r: int = 8
    """rank of every adapter"""
    shared_rank: int = 8
    """rank k of each group's shared bases"""
    groups: int = 1
    noise: float = 0.0
    """ε, relative to the entries of the planted factors"""
    lora_alpha: float = 16.0
    seed: int = 0


def target_name(layer: int, module: str) -> str:
    parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{parent}.{module}"


def planted_factors(spec: PlantedSpec) -> tuple[list[dict], list[dict], list[int]]:
    """Per adapter, effective (scaled) lora_A / lora_B dicts, and each adapter's group."""
    g = torch.Generator().manual_seed(spec.seed)
    groups = [i % spec.groups for i in range(spec.n)]
    As: list[dict] = [{} for _ in range(spec.n)]
    Bs: list[dict] = [{} for _ in range(spec.n)]
    for layer in range(spec.layers):
        for module, d_in, d_out in spec.modules:
            t = target_name(layer, module)
            bases = [
                (
                    torch.linalg.qr(torch.randn(d_out, spec.shared_rank, generator=g))[0],
                    torch.linalg.qr(torch.randn(d_in, spec.shared_rank, generator=g))[0],
                )
                for _ in range(spec.groups)
            ]
            for i in range(spec.n):
                U, V = bases[groups[i]]
                C = torch.randn(spec.shared_rank, spec.r, generator=g)
                D = torch.randn(spec.shared_rank, spec.r, generator=g)
                B = U @ C + spec.noise * torch.randn(d_out, spec.r, generator=g) / d_out**0.5
                A = D.T @ V.T + spec.noise * torch.randn(spec.r, d_in, generator=g) / d_in**0.5
                As[i][t], Bs[i][t] = A, B
    return As, Bs, groups


def write_planted(
    out_dir: str | os.PathLike,
    spec: PlantedSpec,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write the planted collection as PEFT directories `out_dir/adapter_0000/...`."""
    out_dir = Path(out_dir)
    As, Bs, groups = planted_factors(spec)
    modules = sorted({m for m, _, _ in spec.modules})
    paths = []
    for i in range(spec.n):
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "kilolora/planted",
            "target_modules": modules,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        paths.append(save_adapter(out_dir / f"adapter_{i:04d}", As[i], Bs[i], config, lora_alpha=spec.lora_alpha))
        if progress is not None:
            progress(1)
    return paths
