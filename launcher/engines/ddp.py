"""DDP: every rank holds the whole model; gradients are averaged across ranks."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from launcher.engines import adamw, dcp_load, dcp_save


def autocast_forward(model: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run the transformers model's own forward under torch.autocast, as accelerate does, so that
    training, evaluation and `generate` (which calls the inner model, not peft's wrapper) all get it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = inner.forward

    @functools.wraps(forward)
    def forward_in_autocast(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    inner.forward = forward_in_autocast


@dataclass
class DDPEngine:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grad_scale: float
    _module: torch.nn.Module

    @classmethod
    def create(cls, model: torch.nn.Module, train_cfg, dist, compute_dtype: torch.dtype = torch.float32) -> "DDPEngine":
        """`compute_dtype` bfloat16: mixed precision as FSDP's MixedPrecisionPolicy does it. What is
        trained is fp32 (master weights, AdamW moments, the gradient all-reduce); forward and backward
        run under autocast. Updates far below a bf16 ulp of the weight would round away otherwise."""
        if compute_dtype != torch.float32:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                        p.data = p.data.float()  # same Parameter object: ties and peft's references hold
            autocast_forward(model, dist.device.type, compute_dtype)
        optimizer = adamw(model, train_cfg, fused_on_cuda=True)
        wrapped = model
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        # DDP averages gradients over ranks; the loop wants their sum.
        return cls(model=wrapped, optimizer=optimizer, grad_scale=float(dist.world_size), _module=model)

    def accumulating(self, is_last_micro_batch: bool):
        # Skip the gradient all-reduce on all but the last micro-batch of a step.
        if isinstance(self.model, DistributedDataParallel) and not is_last_micro_batch:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self._module.parameters(), max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def step_applied(self) -> bool:
        return True  # torch's AdamW applies every step

    def unwrapped(self) -> torch.nn.Module:
        return self._module

    def save_checkpoint(self, path) -> None:
        dcp_save(self.model, self.optimizer, path)

    def load_checkpoint(self, path) -> None:
        dcp_load(self.model, self.optimizer, path)
