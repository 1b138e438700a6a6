"""LoRA kernels for serving: each op has a Triton kernel, a checked wrapper, a torch path, a
float64 reference and a benchmark entry (`python -m serving.kernels.<op> --help`).

- `bank_lora`: adapters compressed into shared per-cluster bases (Compress then Serve).
- `dense_lora`: uncompressed adapters gathered per token (Punica/S-LoRA BGMV/SGMV).

Kernels import nothing else from the project.
"""

from serving.kernels.bank_lora import BankGroups, bank_lora, group_by_cluster, triton_available
from serving.kernels.dense_lora import dense_lora

__all__ = ["BankGroups", "bank_lora", "dense_lora", "group_by_cluster", "triton_available"]
