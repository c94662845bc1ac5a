"""Engines wrap the model and optimizer for one parallelism strategy.

The loop in train.py talks only to this interface, so ddp, fsdp and deepspeed behave
the same to it. `backward` receives a loss already normalised for the whole optimizer
step (see train.py); engines must not rescale it further except to undo their own
gradient averaging across ranks, which `grad_scale` reports.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Protocol

import torch


class Engine(Protocol):
    model: torch.nn.Module  # what the loop calls forward on
    optimizer: torch.optim.Optimizer
    # Multiplier for the loss so that the engine's cross-rank gradient average becomes a sum.
    grad_scale: float

    def accumulating(self, is_last_micro_batch: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_and_step(self, max_norm: float) -> float: ...

    def step_applied(self) -> bool: ...  # False when the engine skipped the last step's update (fp16 overflow)

    def unwrapped(self) -> torch.nn.Module: ...

    def save_checkpoint(self, path) -> None: ...

    def load_checkpoint(self, path) -> None: ...


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors), as is standard."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Under ZeRO-3's zero.Init a parameter is an empty 1-D partition; DeepSpeed keeps its real shape.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, train_cfg, fused_on_cuda: bool = False) -> torch.optim.AdamW:
    """torch's AdamW from the recipe's train section, the same on every engine (so their numbers agree).

    `fused_on_cuda`: use the fused kernel (one launch per step instead of several per tensor) when
    every trainable parameter is a floating CUDA tensor. Elsewhere torch's default stays (for-loop on
    CPU, so CPU numbers are as before; foreach on CUDA). DeepSpeed passes False: it swaps the
    groups' parameters for its own flat partitions, which may live on the CPU (offload)."""
    groups = param_groups(model, train_cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = fused_on_cuda and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups,
        lr=train_cfg.lr,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        eps=train_cfg.adam_eps,
        **({"fused": True} if fused else {}),
    )


def load_dtype(recipe, device: torch.device) -> torch.dtype:
    """The dtype the worker loads weights in, per engine. fsdp and ddp keep fp32 master weights and
    compute in the training dtype themselves (fsdp: MixedPrecisionPolicy; ddp: autocast), except that
    a LoRA base under ddp, frozen and never updated, stays in the training dtype (peft keeps the
    adapters fp32). DeepSpeed gets the training dtype and keeps its own fp32 master copy."""
    from launcher.model import resolve_dtype

    train_dtype = resolve_dtype(recipe.model.dtype, device)
    backend = recipe.strategy.backend
    if backend == "fsdp" or (backend == "ddp" and not recipe.lora.enabled):
        return torch.float32
    return train_dtype


@contextlib.contextmanager
def _single_process_quiet():
    # A one-rank ddp run has no process group; DCP then warns that it assumes one process, which is right.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The model and optimizer state as DCP saves and loads it: this rank's shards (DTensors under
    FSDP), trainable tensors only when some parameters are frozen (a LoRA base is not saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    module = getattr(model, "module", model)  # DDP's wrapper adds no names to the state dict
    params = dict(module.named_parameters(remove_duplicate=False))
    if not all(p.requires_grad for p in params.values()):
        # ignore_frozen_params misses a frozen weight tied to another (lm_head = embed_tokens), which
        # named_parameters() lists once: keep only trainable tensors, so a LoRA checkpoint holds no base weight.
        model_state = {k: v for k, v in model_state.items() if k in params and params[k].requires_grad}
    return model_state, optim_state


def dcp_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """ddp and fsdp checkpoints: torch DCP writes each rank's shards (replicated tensors once) in
    parallel and reshards on load, so a run may resume on another number of ranks."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = _dcp_state(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def dcp_load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Read a dcp_save checkpoint into this rank's model and optimizer, resharding as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optim_state = _dcp_state(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),  # the frozen base is not in it
    )


def model_init(recipe, dist, accumulation: int) -> contextlib.AbstractContextManager:
    """Where the worker loads the model: ZeRO-3 partitions weights while they are read."""
    if recipe.strategy.backend == "deepspeed":
        from launcher.engines import deepspeed

        return deepspeed.model_init(recipe, dist, accumulation)
    return contextlib.nullcontext()


def build(recipe, model, dist, accumulation: int):
    """Wrap `model` for `strategy.backend`. Engine modules are imported only when chosen."""
    backend = recipe.strategy.backend
    if backend == "ddp":
        from launcher.engines.ddp import DDPEngine
        from launcher.model import resolve_dtype

        return DDPEngine.create(model, recipe.train, dist, compute_dtype=resolve_dtype(recipe.model.dtype, dist.device))
    if backend == "fsdp":
        from launcher.engines.fsdp import FSDPEngine

        return FSDPEngine.create(model, recipe, dist)
    if backend == "deepspeed":
        from launcher.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine.create(model, recipe, dist, accumulation)
    raise ValueError(f"strategy.backend {backend!r} is not available")
