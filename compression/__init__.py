"""Compress a collection of PEFT LoRA adapters into a shared-basis bank.

`B_i A_i ≈ U_k Σ_i V_kᵀ` per target (an adapted (layer, module), as in peft's `target_modules`)
and cluster k, with Σ_i the adapter's core, after Brüel-Gabrielsson et al., "Compress then
Serve" (ICML 2025). Depends on torch and safetensors only.

    from compression import load_collection, compress, CompressConfig, Bank
    bank = compress(load_collection(["adapters/"]), CompressConfig(method="jd-full", rank=16))
    bank.save("bank/")
"""

from .bank import Bank, BankEntry
from .compress import CompressConfig, compress
from .jd import METHODS, TargetFit, jd_diag, jd_full, svd_per_adapter
from .peft_io import Collection, LoraAdapter, TargetInfo, find_adapter_dirs, load_adapter, load_collection, save_adapter

__all__ = [
    "Bank",
    "BankEntry",
    "Collection",
    "CompressConfig",
    "LoraAdapter",
    "METHODS",
    "TargetFit",
    "TargetInfo",
    "compress",
    "find_adapter_dirs",
    "jd_diag",
    "jd_full",
    "load_adapter",
    "load_collection",
    "save_adapter",
    "svd_per_adapter",
]
