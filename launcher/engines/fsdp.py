"""FSDP2: parameters, gradients and optimizer state are sharded across ranks with `fully_shard`.

Each block class (the model's `_no_split_modules`, or `strategy.fsdp_wrap`) becomes one
all-gather / reduce-scatter unit; the root unit takes what is left (embeddings, final norm,
a tied lm_head), so tied weights stay one parameter in one unit. `fully_shard` changes the
module in place: the HF model is also what the loop calls forward on, and `generate` runs with
ranks in step because launcher/generation.py passes synced_gpus itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

from launcher.dist import backend_for
from launcher.engines import adamw, dcp_load, dcp_save
from launcher.errors import UserError
from launcher.model import materialize, resolve_dtype


def block_classes(model: torch.nn.Module) -> list:
    """Class names that look like repeated blocks: the model's `_no_split_modules` and ModuleList items."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            names.update(type(m).__name__ for m in module)
    return sorted(names)


def check_wrap_classes(model_or_config, recipe) -> list:
    """The class names to shard one by one; raises UserError if the model has none of some name.

    Takes a module or a transformers config (then a weightless model is built on the meta
    device), so `sft plan` can call it before any worker starts.
    """
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config, trust_remote_code=recipe.model.trust_remote_code)
    wanted = list(recipe.strategy.fsdp_wrap) or list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    missing = [name for name in wanted if name not in present]
    if missing:
        raise UserError(
            f"strategy.fsdp_wrap: {type(model).__name__} has no module class {', '.join(missing)}. "
            f"Its block classes are: {', '.join(block_classes(model)) or '(none found)'}. "
            "Use one of those, or leave fsdp_wrap empty to use the model's default."
        )
    return wanted


def _ensure_process_group(dist) -> None:
    # FSDP2 needs a process group and a device mesh even on one rank. An in-process store
    # needs no port; dist.distributed then reports True and dist.shutdown() destroys it.
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend_for(dist.device), store=torch_dist.HashStore(), rank=0, world_size=1)


def _fill_from_rank0(model: torch.nn.Module, full: dict, device: torch.device) -> None:
    """Scatter rank 0's weights into every rank's shards: a node holds one full copy, not one per rank."""
    if any(p.is_meta for p in model.parameters()):
        materialize(model, device)  # storage for this rank's shards only
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once, on every rank
            source = full[name].to(device) if full else torch.empty(param.shape, dtype=param.dtype, device=device)
            shard = distribute_tensor(source, param.device_mesh, param.placements, src_data_rank=0)
            param.to_local().copy_(shard.to_local())


@dataclass
class FSDPEngine:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grad_scale: float

    @classmethod
    def create(cls, model: torch.nn.Module, recipe, dist) -> "FSDPEngine":
        st, train_cfg = recipe.strategy, recipe.train
        wrap = set(check_wrap_classes(model, recipe))
        _ensure_process_group(dist)
        world = torch_dist.get_world_size()
        mesh = init_device_mesh(dist.device.type, (world,))
        kwargs = dict(mesh=mesh, reshard_after_forward=st.reshard_after_forward)
        # On a CPU-only run everything already lives in CPU memory (and CPUOffloadPolicy needs an accelerator).
        offload = st.cpu_offload and dist.device.type != "cpu"
        kwargs["offload_policy"] = CPUOffloadPolicy() if offload else OffloadPolicy()
        if resolve_dtype(recipe.model.dtype, dist.device) == torch.bfloat16:
            # The worker loads fp32 for FSDP: sharded master weights and optimizer state stay fp32,
            # forward/backward run in bf16, and gradients are reduced in fp32.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # Rank 0 holds the loaded weights, other ranks a meta-device skeleton (worker.py).
        full = model.state_dict() if torch_dist.get_rank() == 0 else {}
        # Bottom-up: each block is its own unit; the root then takes the remaining parameters.
        for module in list(model.modules()):
            if module is not model and type(module).__name__ in wrap:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        if hasattr(model, "get_base_model"):
            # peft's generate calls the inner model's generate, never the root's forward, so the root
            # unit (embeddings, final norm, head) would stay sharded: gather it around generate too.
            register_fsdp_forward_method(model, "generate")
        _fill_from_rank0(model, full, dist.device)
        del full
        # Built after sharding, so the optimizer holds the DTensor shards (its state is sharded too).
        optimizer = adamw(model, train_cfg, fused_on_cuda=True)
        # The reduce-scatter averages over ranks (gradient_divide_factor = world); the loop wants the sum.
        return cls(model=model, optimizer=optimizer, grad_scale=float(world))

    @contextlib.contextmanager
    def accumulating(self, is_last_micro_batch: bool):
        # Non-last micro-batches keep unsharded gradients locally; the last one reduce-scatters their sum.
        self.model.set_requires_gradient_sync(is_last_micro_batch)
        try:
            yield
        finally:
            # Leave sync on, so a backward outside this context (or the next step) never skips it.
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        # With DTensor gradients the norm is a DTensor over the shards; full_tensor() gives the global one.
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def step_applied(self) -> bool:
        return True  # torch's AdamW applies every step

    def unwrapped(self) -> torch.nn.Module:
        return self.model

    def save_checkpoint(self, path) -> None:
        dcp_save(self.model, self.optimizer, path)

    def load_checkpoint(self, path) -> None:
        dcp_load(self.model, self.optimizer, path)
