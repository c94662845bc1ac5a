"""DDP: every rank holds the whole model; gradients are averaged across ranks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from launcher.engines import adamw, dcp_load, dcp_save


@dataclass
class DDPEngine:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grad_scale: float
    _module: torch.nn.Module

    @classmethod
    def create(cls, model: torch.nn.Module, train_cfg, dist) -> "DDPEngine":
        optimizer = adamw(model, train_cfg)
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
