"""Checks on a recipe's values alone (no files, no model, no GPU); plan.py does the rest."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from launcher.errors import RecipeError
from launcher.recipe import Recipe

_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.format": ("messages", "sharegpt", "alpaca", "completion", "text"),
    "data.too_long": ("truncate", "drop", "error"),
    "task.type": ("sft", "classification"),
    "task.head": ("lm", "sequence"),
    "strategy.backend": ("ddp", "fsdp", "deepspeed"),
    "export.dtype": ("auto", "float32", "bfloat16", "float16"),
}


def _get(recipe: Recipe, dotted: str):
    obj: Any = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(recipe: Recipe) -> None:
    for key, choices in _CHOICES.items():
        value = _get(recipe, key)
        if value not in choices:
            raise RecipeError(f"`{key}: {value}` is not one of {', '.join(choices)}.")
    _check_numbers(recipe)
    positive = ["train.micro_batch_size", "data.max_seq_len", "launch.nproc_per_node", "logging.every_steps"]
    for key in positive:
        if _get(recipe, key) < 1:
            raise RecipeError(f"`{key}` must be at least 1, got {_get(recipe, key)}.")
    _check_logging(recipe.logging)
    la = recipe.launch
    if la.gpu_memory_gib is not None and la.gpu_memory_gib <= 0:
        raise RecipeError(f"`launch.gpu_memory_gib` must be positive (GiB of memory per GPU), got {la.gpu_memory_gib}.")
    if la.collective_timeout_s < 1:
        raise RecipeError(f"`launch.collective_timeout_s` must be at least 1 second, got {la.collective_timeout_s}.")
    if la.nnodes < 1 or not 0 <= la.node_rank < la.nnodes:
        raise RecipeError(f"`launch.node_rank` must be in [0, launch.nnodes) and nnodes >= 1; got node_rank={la.node_rank}, nnodes={la.nnodes}.")
    t = recipe.train
    if t.eval_generate < 0 or t.eval_generate_batch_size < 0:
        raise RecipeError(f"`train.eval_generate` and `train.eval_generate_batch_size` must be >= 0 (0: off / the micro batch), got {t.eval_generate} and {t.eval_generate_batch_size}.")
    from transformers import SchedulerType  # the names transformers.get_scheduler accepts

    schedulers = [s.value for s in SchedulerType]
    if t.lr_scheduler not in schedulers:
        raise RecipeError(f"`train.lr_scheduler: {t.lr_scheduler}` is not one of {', '.join(schedulers)}.")
    if t.gradient_accumulation_steps is not None and t.global_batch_size is not None:
        raise RecipeError("Set only one of `train.gradient_accumulation_steps` and `train.global_batch_size`: the other follows from micro batch and world size.")
    if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps < 1:
        raise RecipeError(f"`train.gradient_accumulation_steps` must be at least 1, got {t.gradient_accumulation_steps}.")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise RecipeError("Training would run no step: set `train.epochs` > 0 or `train.max_steps` > 0.")
    _check_sources(recipe)
    if not 0.0 <= recipe.data.eval_fraction < 1.0:
        raise RecipeError(f"`data.eval_fraction` must be in [0, 1), got {recipe.data.eval_fraction}.")
    if recipe.data.eval_files and recipe.data.eval_fraction > 0:
        raise RecipeError("Set either `data.eval_files` or `data.eval_fraction`, not both.")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise RecipeError(f"`train.warmup_ratio` must be in [0, 1), got {t.warmup_ratio}.")
    st = recipe.strategy
    if recipe.model.dtype == "float16" and st.backend != "deepspeed":
        raise RecipeError(
            f"`model.dtype: float16` with `strategy.backend: {st.backend}` would train without loss scaling, so small "
            "gradients underflow. Use bfloat16, or strategy.backend=deepspeed (dynamic loss scaling)."
        )
    if st.zero_stage not in (0, 1, 2, 3):
        raise RecipeError(f"`strategy.zero_stage: {st.zero_stage}` is not a ZeRO stage; use 0, 1, 2 or 3.")
    if st.backend == "deepspeed" and st.offload_params and st.zero_stage != 3:
        raise RecipeError(f"`strategy.offload_params: true` needs `strategy.zero_stage: 3` (got {st.zero_stage}): only stage 3 partitions parameters.")
    if st.backend == "deepspeed" and st.offload_optimizer and st.zero_stage == 0:
        raise RecipeError("`strategy.offload_optimizer: true` needs `strategy.zero_stage` 1, 2 or 3: stage 0 does not partition the optimizer.")
    lora = recipe.lora
    if lora.enabled:
        if lora.r < 1 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0:
            raise RecipeError(f"`lora`: r must be >= 1, alpha > 0 and dropout in [0, 1); got r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}.")
        if not lora.target_modules:
            raise RecipeError("`lora.target_modules` is empty: name the modules to adapt (e.g. [q_proj, v_proj]) or use [all-linear].")
        if "all-linear" in lora.target_modules and len(lora.target_modules) > 1:
            raise RecipeError("`lora.target_modules`: `all-linear` already selects every linear layer; give it alone or list names instead.")
    if recipe.task.type == "classification":
        _check_classification(recipe)
    _check_packing(recipe)
    ck = recipe.checkpoint
    if ck.every_steps < 0 or ck.every_minutes < 0 or ck.keep_last < 1:
        raise RecipeError(
            "`checkpoint.every_steps` and `checkpoint.every_minutes` must be >= 0 and `checkpoint.keep_last` >= 1; "
            f"got {ck.every_steps}, {ck.every_minutes} and {ck.keep_last}."
        )
    if ck.signal_grace_s <= 0:
        raise RecipeError(f"`checkpoint.signal_grace_s` must be > 0 seconds, got {ck.signal_grace_s}.")
    if not ck.resume.strip():
        raise RecipeError("`checkpoint.resume` is empty: use auto, never, or the path of a checkpoint or run dir.")
    ex = recipe.export
    if ex.verify_prompts < 1 or (ex.verify_tolerance is not None and ex.verify_tolerance < 0):
        raise RecipeError("`export.verify_prompts` must be >= 1 and `export.verify_tolerance` >= 0 (or unset for auto).")
    _check_size("export.max_shard_size", ex.max_shard_size)


def _check_sources(recipe: Recipe) -> None:
    data = recipe.data
    if not data.train_files and not data.sources:
        raise RecipeError("No training data: set `data.train_files` (local files) or `data.sources` (files or Hub datasets, with weights).")
    formats = _CHOICES["data.format"]
    for i, src in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if src.format is not None and src.format not in formats:
            raise RecipeError(f"`{key}.format: {src.format}` is not one of {', '.join(formats)}.")
        if src.weight is not None and src.fraction is not None:
            raise RecipeError(f"`{key}` ({src.path}) sets both weight and fraction; a weight is a share of the mixture, a fraction a share of this source's rows. Keep one.")
        if src.weight is not None and src.weight < 0:
            raise RecipeError(f"`{key}.weight` ({src.path}) is {src.weight:g}; weights are shares of the mixture and must be >= 0.")
        if src.fraction is not None and src.fraction <= 0:
            raise RecipeError(f"`{key}.fraction` ({src.path}) is {src.fraction:g}; it must be > 0 (remove the source to leave it out).")
    weighted = [s.weight is not None for s in data.sources]
    if any(weighted):
        if not all(weighted) or data.train_files:
            raise RecipeError(
                "`data.sources`: weights are shares of one mixture, so give every source a weight (and list data.train_files as "
                "sources too) or none; without weights every row of every source is used once."
            )
        if sum(s.weight for s in data.sources) <= 0:
            raise RecipeError("`data.sources`: every weight is 0, so the mixture would be empty. Give at least one source a weight > 0.")


# Ranges of numeric keys not checked elsewhere: (key, lowest, highest, how the bounds read).
# None: no bound on that side; the bounds are inclusive unless the text says otherwise.
_RANGES = [
    ("seed", 0, 2**32 - 1, "an integer in [0, 2^32)"),  # numpy's seed range
    ("train.lr", 0.0, None, "> 0"),
    ("train.epochs", 0.0, None, ">= 0"),
    ("train.warmup_steps", 0, None, ">= 0"),
    ("train.weight_decay", 0.0, None, ">= 0"),
    ("train.adam_beta1", 0.0, 1.0, "in [0, 1)"),
    ("train.adam_beta2", 0.0, 1.0, "in [0, 1)"),
    ("train.adam_eps", 0.0, None, "> 0"),
    ("train.max_grad_norm", 0.0, None, ">= 0 (0: no clipping)"),
    ("train.eval_every", 0, None, ">= 0 (0: only at the end)"),
    ("train.eval_generate", 0, None, ">= 0"),
    ("launch.max_restarts", 0, None, ">= 0"),
    ("slurm.nodes", 1, None, "at least 1"),
    ("slurm.gpus_per_node", 0, None, ">= 0 (0 on CPU-only clusters)"),
    ("slurm.signal_before_end_s", 0, None, ">= 0 seconds"),
]
_EXCLUSIVE = {"train.lr": "low", "train.adam_eps": "low", "train.adam_beta1": "high", "train.adam_beta2": "high"}
# Larger integers overflow torch's int64 arithmetic or timedelta long before they mean anything.
_LARGEST_INT = 2**40


def _numbers(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{f.name}", value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield f"{prefix}{f.name}[{i}]", v


def _check_numbers(recipe: Recipe) -> None:
    for key, value in _numbers(recipe):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"`{key}: {value}` is not a finite number; give it a number (see recipes/quickstart.yaml for typical values).")
        if abs(value) > _LARGEST_INT and key != "seed":
            raise RecipeError(f"`{key}: {value}` is far too large (at most {_LARGEST_INT:,}); check for a typo.")
    if recipe.slurm.cpus_per_task is not None and recipe.slurm.cpus_per_task < 1:
        raise RecipeError(f"`slurm.cpus_per_task` must be at least 1 (or unset), got {recipe.slurm.cpus_per_task}.")
    if recipe.train.global_batch_size is not None and recipe.train.global_batch_size < 1:
        raise RecipeError(f"`train.global_batch_size` must be at least 1 (or unset), got {recipe.train.global_batch_size}.")
    for key, low, high, text in _RANGES:
        value = _get(recipe, key)
        open_side = _EXCLUSIVE.get(key)
        below = low is not None and (value < low or (open_side == "low" and value == low))
        above = high is not None and (value > high or (open_side == "high" and value == high))
        if below or above:
            raise RecipeError(f"`{key}` must be {text}, got {value}. Fix it in the recipe or with {key}=VALUE.")


def _check_classification(recipe: Recipe) -> None:
    task = recipe.task
    if not task.text_field or not task.label_field or task.text_field == task.label_field:
        raise RecipeError(f"`task.text_field` and `task.label_field` must be two different column names; got {task.text_field!r} and {task.label_field!r}.")
    labels = list(task.labels)
    if labels:
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise RecipeError(f"`task.labels` lists {', '.join(map(repr, repeated))} more than once; list each class once.")
        if any(not x.strip() for x in labels):
            raise RecipeError("`task.labels` has an empty label; every class needs a name.")
        if len(labels) < 2:
            raise RecipeError(f"`task.labels` has a single class ({labels[0]!r}); classification needs at least two.")
    if task.head == "lm":
        try:
            task.prompt.format(text="", labels="")
        except (KeyError, IndexError, ValueError) as e:
            raise RecipeError(
                f"`task.prompt` is not a valid template ({type(e).__name__}: {e}). It may use {{text}} and {{labels}}; "
                "write a literal brace as {{{{ or }}}}."
            ) from None
        if "{text}" not in task.prompt:
            raise RecipeError("`task.prompt` has no {text} placeholder, so the model would never see the text to classify. Add {text}.")
        if task.class_weights:
            raise RecipeError("`task.class_weights` is for `task.head: sequence`; with head lm the loss is on the label's tokens. Remove it or use head sequence.")
    if task.class_weights:
        if any(w <= 0 for w in task.class_weights):
            raise RecipeError(f"`task.class_weights` must all be > 0; got {list(task.class_weights)}.")
        if labels and len(task.class_weights) != len(labels):
            raise RecipeError(f"`task.class_weights` has {len(task.class_weights)} weights for {len(labels)} labels; give one per label, in the order of `task.labels`.")
        if not labels:
            raise RecipeError("`task.class_weights` needs `task.labels` listed, so each weight has a known class.")
    if recipe.train.eval_generate:
        raise RecipeError("`train.eval_generate` is for sft; classification evaluates by scoring every label (eval_accuracy, eval_macro_f1). Remove it.")


def _check_packing(recipe: Recipe) -> None:
    from launcher.attention import PACKED, VARLEN, packs_cleanly

    d = recipe.data
    if d.pack_tokens is not None and d.pack_tokens < 1:
        raise RecipeError(f"`data.pack_tokens` must be at least 1 (or unset for train.micro_batch_size x data.max_seq_len), got {d.pack_tokens}.")
    if recipe.train.loss_chunk_tokens < 0:
        raise RecipeError(f"`train.loss_chunk_tokens` must be >= 0 (0: off), got {recipe.train.loss_chunk_tokens}.")
    if not d.packing:
        return
    if recipe.task.type == "classification":
        raise RecipeError(
            "`data.packing: true` with `task.type: classification`: a classifier reads each row's last token (or scores "
            "labels per row), so its rows are not packed. Remove data.packing (classification batches are grouped by length)."
        )
    name = recipe.model.attn_implementation
    if not packs_cleanly(name):
        allowed = ", ".join(str(n) for n in [*(k for k in PACKED if k), *VARLEN]) + " or a kernels-hub flash kernel"
        raise RecipeError(
            f"`data.packing: true` with `model.attn_implementation: {name}`: that attention cannot keep the examples of a packed "
            f"row apart, so they would attend to each other. Use one of {allowed}, or set data.packing: false."
        )


def _check_size(key: str, value: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(value)
    except (ValueError, TypeError):
        raise RecipeError(f"`{key}: {value}` is not a size; write it like 5GB, 500MB or 2GiB.") from None


def _check_logging(lo) -> None:
    from launcher.trackers import NAMES

    unknown = [n for n in lo.report_to if n not in NAMES]
    if unknown:
        raise RecipeError(f"`logging.report_to`: unknown tracker {', '.join(map(repr, unknown))}. Use a list of {', '.join(NAMES)} (or [] for none).")
    if lo.wandb_mode not in (None, "online", "offline", "disabled"):
        raise RecipeError(f"`logging.wandb_mode: {lo.wandb_mode}` is not one of online, offline, disabled.")
