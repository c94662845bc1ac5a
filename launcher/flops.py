"""Model FLOPs utilisation: the FLOPs training needs per token, against the GPU's peak.

Per token, full training costs 6N FLOPs for the N parameters used in matmuls (forward
2N, backward 4N) plus 12 * layers * hidden * seq_len for attention scores and values
(the PaLM appendix B convention, causal masking not discounted). The input embedding
is a lookup, not a matmul, so it is left out of N unless it is tied to the output head.
"""

from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name(); the first key found in the name wins.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device_name: str) -> Optional[float]:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls; ZeRO-3 partitions report their full size in ds_numel."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())
    embed = model.get_input_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    return total if tied else total - numel(embed.weight)


def flops_per_token(n_matmul_params: int, layers: int, hidden: int, seq_len: float) -> float:
    return 6 * n_matmul_params + 12 * layers * hidden * seq_len


class MFU:
    """MFU of a step on this rank's GPU; None on CPU or an unknown GPU."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        config = model.config
        self.n = matmul_params(model)
        self.layers, self.hidden = config.num_hidden_layers, config.hidden_size

    def __call__(self, tokens: int, sequences: int, seconds: float, world_size: int) -> Optional[float]:
        if self.peak is None or seconds <= 0 or sequences == 0:
            return None
        per_token = flops_per_token(self.n, self.layers, self.hidden, tokens / sequences)
        return per_token * tokens / (seconds * self.peak * world_size)
