"""DeepSpeed ZeRO stages 0-3 behind the loop's engine interface.

The DeepSpeed config is generated from the recipe (batch sizes, clipping, precision,
ZeRO stage and offload) and `strategy.deepspeed_config` is merged over it; a user value
that contradicts the recipe's batch arithmetic is an error, not a silent override.

Gradient accumulation is driven by the loop, not by DeepSpeed's micro-step counter: the
loop marks the last micro-batch of a step, calls `backward` with the loss already
normalised for the whole step (so `scale_wrt_gas=False`), and steps once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch

from launcher.engines import adamw
from launcher.errors import UserError
from launcher.model import resolve_dtype

# Keys the recipe owns: a user DeepSpeed config may repeat them only with the same value.
_RECIPE_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps / train.global_batch_size",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "train.max_grad_norm",
}

# Blocks a user DeepSpeed config may not have: the loop owns the optimizer and the LR schedule on every engine.
_RECIPE_BLOCKS = (
    ("optimizer", "which DeepSpeed would ignore (the launcher passes its own torch AdamW, built from the recipe)",
     "train.lr, train.weight_decay, train.adam_beta1, train.adam_beta2 and train.adam_eps"),
    ("scheduler", "which DeepSpeed would step inside engine.step() on top of the launcher's LR schedule (two schedules setting one learning rate)",
     "train.lr_scheduler, train.warmup_steps (or train.warmup_ratio) and train.lr"),
    ("checkpoint", "which would change how DeepSpeed writes its shards (node-local storage, decoupled or background writers) under the "
     "launcher's own atomic commit, checksums and resume", "checkpoint.every_steps, checkpoint.every_minutes and checkpoint.keep_last"),
)


def _user_config(value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    path = Path(str(value))
    if not path.is_file():
        raise UserError(f"strategy.deepspeed_config: {path} does not exist. Give a JSON or YAML file, or a mapping in the recipe.")
    import yaml  # YAML is a superset of JSON

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"strategy.deepspeed_config: {path} is not valid JSON or YAML: {str(e).splitlines()[0]}.") from None
    if not isinstance(data, dict):
        raise UserError(f"strategy.deepspeed_config: {path} must hold a mapping of DeepSpeed settings.")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(recipe, world_size: int, accumulation: int, device_type: str, hidden_size: int = 0) -> Dict[str, Any]:
    """The DeepSpeed config for this recipe; raises UserError when the user's config contradicts it."""
    st, t = recipe.strategy, recipe.train
    zero: Dict[str, Any] = {"stage": st.zero_stage}
    if hidden_size:
        # Buckets sized to the model, as transformers' "auto" does: DeepSpeed's fixed defaults
        # (5e8 elements) cost 2 GB per rank even for a tiny model, and stage 3's default
        # persistence threshold (1e5) would leave a small model's matrices unsharded.
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if st.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if st.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if st.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if st.zero_stage == 3:
        # Without it, saving under stage 3 writes empty weights (DESIGN.md, known traps).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * accumulation * world_size,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
        # The client optimizer is torch AdamW, so numbers match the other engines; with
        # offload DeepSpeed would otherwise insist on its compiled CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    dtype = resolve_dtype(recipe.model.dtype, torch.device(device_type))
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    user = dict(_user_config(st.deepspeed_config))  # a copy: the recipe's own mapping stays as written
    for block, what, keys in _RECIPE_BLOCKS:
        if block in user:
            raise UserError(
                f"strategy.deepspeed_config has a `{block}` block, {what}. Remove it from the DeepSpeed config and set {keys} "
                "in the recipe instead."
            )
    for key, recipe_key in _RECIPE_OWNED.items():
        if key in user and user[key] not in ("auto", config[key]):
            raise UserError(
                f"strategy.deepspeed_config sets {key}={user[key]!r}, but the recipe gives {config[key]!r} "
                f"(from {recipe_key}). Set it in the recipe, or remove it from the DeepSpeed config (or use \"auto\")."
            )
        user.pop(key, None)
    user_stage = user.get("zero_optimization", {}).get("stage", st.zero_stage)
    if user_stage != st.zero_stage:
        raise UserError(
            f"strategy.deepspeed_config sets zero_optimization.stage={user_stage}, but strategy.zero_stage is {st.zero_stage}. "
            "Set the stage with strategy.zero_stage only."
        )
    return _merge(config, user)


@contextlib.contextmanager
def model_init(recipe, dist, accumulation: int):
    """Stage 3: load the model under HfDeepSpeedConfig so from_pretrained partitions weights as it reads them."""
    if recipe.strategy.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    _ensure_process_group(dist)
    keep = HfDeepSpeedConfig(make_config(recipe, dist.world_size, accumulation, dist.device.type))  # noqa: F841 (held by weakref)
    yield
    del keep


def _ensure_process_group(dist) -> None:
    """DeepSpeed needs a process group even for one rank, and its comm layer must adopt ours."""
    import deepspeed
    import torch.distributed as torch_dist

    from launcher.dist import backend_for

    # gloo for the loop's CPU collectives, NCCL for DeepSpeed's CUDA ones (launcher/dist.py).
    backend = backend_for(dist.device)
    # DeepSpeed reads the rank's device from the environment (zero.Init: os.environ["LOCAL_RANK"]);
    # a one-process run without torchrun (`sft run` with one rank runs the worker in process) has none.
    for key, value in (("RANK", dist.rank), ("LOCAL_RANK", dist.local_rank), ("WORLD_SIZE", dist.world_size)):
        os.environ.setdefault(key, str(value))
    if not torch_dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    # With a group in place DeepSpeed only wraps it (TorchBackend skips init_process_group), so the
    # combined backend string is never parsed by DeepSpeed itself.
    deepspeed.init_distributed(dist_backend=backend)


@contextlib.contextmanager
def _failed_writes_held(model):
    """DeepSpeed's save_checkpoint puts barriers between its writes, so a rank whose write raises (a
    full disk) leaves its peers waiting in the next barrier until the collective timeout. Inside this
    block a failed write is recorded, the rank's later writes are skipped and it passes the same
    barriers as its peers; the first error is raised once DeepSpeed returns, where checkpoint.save
    tells every rank."""
    errors = []

    def held(write):
        def call(*args, **kwargs):
            if errors:
                return None
            try:
                return write(*args, **kwargs)
            except Exception as e:  # torch.save reports a failed write as RuntimeError, copyfile as OSError
                errors.append(e)
                return None

        return call

    # shutil.copytree: NVMe optimizer offload copies its swap files into the checkpoint (imported at call time).
    writers = [(model.checkpoint_engine, "save"), (model.checkpoint_engine, "makedirs"), (model, "_copy_recovery_script"),
               (shutil, "copytree")]
    shadowed = [(owner, name, vars(owner).get(name)) for owner, name in writers]
    for owner, name in writers:
        setattr(owner, name, held(getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, own in shadowed:
            if own is None:
                delattr(owner, name)  # the class's method shows through again
            else:
                setattr(owner, name, own)
    if errors:
        raise errors[0]


@dataclass
class DeepSpeedEngine:
    model: Any  # the deepspeed.DeepSpeedEngine: forward, backward, step
    optimizer: torch.optim.Optimizer  # the client AdamW: the LR scheduler sets its param_groups' lr
    grad_scale: float
    zero_stage: int

    @classmethod
    def create(cls, model: torch.nn.Module, recipe, dist, accumulation: int) -> "DeepSpeedEngine":
        import deepspeed

        _ensure_process_group(dist)
        optimizer = adamw(model, recipe.train)
        config = make_config(recipe, dist.world_size, accumulation, dist.device.type, model.config.hidden_size)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        # DeepSpeed averages gradients across ranks; the loop's loss is already a global mean.
        return cls(model=engine, optimizer=optimizer, grad_scale=float(dist.world_size), zero_stage=recipe.strategy.zero_stage)

    def accumulating(self, is_last_micro_batch: bool):
        self.model.set_gradient_accumulation_boundary(is_last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self, max_norm: float) -> float:
        # Clipping is DeepSpeed's (gradient_clipping in the config), applied inside step().
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step_applied(self) -> bool:
        # False when DeepSpeed skipped the update: an fp16 overflow (it lowers the loss scale), or under
        # ZeRO a non-finite gradient norm in any dtype.
        return self.model.was_step_applied()

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def save_checkpoint(self, path) -> None:
        # Our own COMPLETE marker commits the checkpoint (DeepSpeed's `latest` is written by rank 0
        # before the other ranks finish); frozen weights (a LoRA base) are not copied.
        with _failed_writes_held(self.model):
            self.model.save_checkpoint(str(path), tag="deepspeed", client_state={}, save_latest=False, exclude_frozen_parameters=True)

    def load_checkpoint(self, path) -> None:
        # Explicit tag (DeepSpeed's own `latest` is not trusted, see save); a LoRA checkpoint has no
        # frozen weights, so the module load is not strict. The LR scheduler is ours, not DeepSpeed's.
        frozen = any(not p.requires_grad for p in self.model.module.parameters())
        loaded, _ = self.model.load_checkpoint(
            str(path), tag="deepspeed", load_module_strict=not frozen, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise UserError(f"DeepSpeed found no checkpoint to load in {path}/deepspeed; the checkpoint is damaged. Resume from an earlier one.")
