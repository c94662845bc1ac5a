"""Every check that can fail before a worker starts, and the numbers of the run.

`sft plan` prints this; `sft run` and `sft submit` run the same checks first. The data
is tokenized here (into the cache the workers read), so every row is checked and the
step counts are exact, not estimates. The memory estimate it prints is launcher/memory.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch

from launcher import hub, trackers
from launcher.cache import cache_root
from launcher.data import packing as packed
from launcher.data.classify import sequence_labels
from launcher.data.formats import FIELDS
from launcher.data.prepare import FileStats, prepare
from launcher.data.stats import length_summary, padding_waste, row_lengths
from launcher.data.tokenize import TemplateError, end_of_turn_check
from launcher.errors import UserError
from launcher.memory import describe, gpu_memory, memory_setup
from launcher.model import load_tokenizer, model_dir
from launcher.recipe import Recipe
from launcher.train import Schedule, make_schedule


@dataclass
class Plan:
    model_path: Path
    architecture: str
    params: int
    trainable: "int | None"  # LoRA: adapters and modules_to_save; None for full fine-tuning
    classes: "object | None"  # data.classify.Classes of a classifier
    dtype: str
    end_of_turn: str
    world_size: int
    schedule: Schedule
    train_examples: int
    eval_examples: int
    mean_tokens: float
    files: List[FileStats]
    mixture: list = None  # data.sources.Share per training source
    memory: "object | None" = None  # memory.Setup: what decides a rank's memory
    padding: float = 0.0  # share of the planned micro-batches' token slots that are padding
    unpacked_padding: float = 0.0  # the same without packing (what data.packing unset decides on)
    warnings: List[str] = field(default_factory=list)


def _model_config(path: Path, recipe: Recipe, labels=None, pad_token_id=None):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from launcher.model import head_config

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code, **head_config(labels, pad_token_id))
    except Exception as e:
        raise UserError(f"model.path: cannot read the config in {path}: {str(e).splitlines()[0]}. If the model needs custom code, set model.trust_remote_code: true.") from None
    auto, known = ("AutoModelForSequenceClassification", MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) if labels else ("AutoModelForCausalLM", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    remote = auto in (getattr(config, "auto_map", None) or {})
    if config.model_type not in known and not remote:
        hint = " Use task.head: sequence for an encoder such as BERT." if auto == "AutoModelForCausalLM" and config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES else ""
        raise UserError(f"model.path: {path} is a `{config.model_type}` model, which transformers cannot load as {auto}.{hint}")
    return config


def _meta_model(config, recipe: Recipe, labels=None):
    """The model's modules without weights or memory (shapes only)."""
    from launcher.model import model_class

    with torch.device("meta"):
        return model_class(labels).from_config(config, trust_remote_code=recipe.model.trust_remote_code)


def check_strategy(recipe: Recipe, accumulation: int) -> None:
    """Engine settings that would only fail inside the workers."""
    gpu = torch.cuda.is_available()
    if recipe.model.dtype == "float16" and not gpu:
        raise UserError("model.dtype: float16 needs a GPU (loss scaling and fp16 kernels are GPU-only here). Use float32 or bfloat16 on CPU.")
    if recipe.strategy.backend == "deepspeed":
        from launcher.engines.deepspeed import make_config

        make_config(recipe, recipe.launch.nproc_per_node * recipe.launch.nnodes, accumulation, "cuda" if gpu else "cpu")


# Flash-attention implementations transformers selects by name, and the distribution each needs.
FLASH_ATTENTION = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn-3", "flash_attention_4": "flash-attn-4"}


def check_attention(recipe: Recipe, cuda: "bool | None") -> None:
    """model.attn_implementation: a flash-attention name needs its package and a CUDA GPU; a Hub
    kernel name (`org/repo[@rev][:fn]`) needs the `kernels` package. `cuda`: whether the run starts
    on this machine and it has a GPU (`sft submit` plans on a login node: it checks packages only)."""
    from importlib.metadata import PackageNotFoundError, distribution

    name = recipe.model.attn_implementation
    if not name:
        return
    hub_kernel = "/" in name
    package = "kernels" if hub_kernel else FLASH_ATTENTION.get(name)
    if package is None:
        return  # eager, sdpa, flex_attention...: transformers checks those against the model itself
    try:
        distribution(package)
    except PackageNotFoundError:
        how = ("it loads the kernel from the Hub (or the HF cache) through the `kernels` package" if hub_kernel
               else f"transformers imports it from the `{package}` package (a wheel built for your torch and CUDA)")
        raise UserError(
            f"model.attn_implementation: {name} is not available here: {how}, which is not installed in this Python "
            f"environment. Install {package}, or leave model.attn_implementation unset (sdpa, torch's fused attention)."
        ) from None
    if cuda is False and (not hub_kernel or "flash" in name):
        raise UserError(
            f"model.attn_implementation: {name} runs on NVIDIA GPUs only, and torch sees no CUDA device here. "
            "Run where the GPUs are, or leave model.attn_implementation unset (sdpa) to train on CPU."
        )


def check_lora(config, recipe: Recipe, labels=None) -> int:
    """Apply the recipe's LoRA to a weightless copy of the model: unknown target modules fail here,
    not in the workers. Returns the number of trainable parameters."""
    from launcher.model import add_lora

    with torch.device("meta"):
        model = add_lora(_meta_model(config, recipe, labels), recipe.lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def packed_attention_check(skeleton, recipe: Recipe) -> None:
    """Packed rows need a model whose attention layers take transformers' attention interface and kwargs."""
    if not getattr(type(skeleton), "_supports_attention_backend", False):
        raise UserError(
            f"data.packing: {type(skeleton).__name__} does not pass packed-row boundaries to its attention "
            "(it does not support transformers' attention interface), so packed examples would attend to each other. "
            "Set data.packing: false."
        )


def _longest(ds) -> int:
    import pyarrow.compute as pc

    return int(pc.max(pc.list_value_length(ds.with_format("arrow")["input_ids"])).as_py() or 0) if ds is not None and len(ds) else 0


def check_positions(config, recipe: Recipe, prepared) -> List[str]:
    """data.max_seq_len beyond the model's positions: refused when a sequence is that long (its positions
    past the limit would be untrained or out of range), a warning line in the plan when none is."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or recipe.data.max_seq_len <= limit:
        return []
    longest = max(_longest(prepared.train), _longest(prepared.eval))
    if longest > limit:
        raise UserError(
            f"data.max_seq_len: {recipe.data.max_seq_len} is beyond the model's max_position_embeddings ({limit}) and the data has "
            f"sequences of up to {longest} tokens, which the model cannot place. Set data.max_seq_len={limit} (longer rows are then "
            "handled by data.too_long), or use a model with a longer context."
        )
    return [f"data.max_seq_len {recipe.data.max_seq_len} is beyond the model's max_position_embeddings ({limit}); no sequence "
            f"here is longer than {longest} tokens, but longer data would be refused. Consider data.max_seq_len={limit}."]


def make_plan(recipe: Recipe, here: bool = True) -> Plan:
    """`here`: the workers start on this machine (sft plan, sft run), so its hardware counts; False
    for `sft submit`, whose job runs on other nodes."""
    trackers.check(recipe)  # before the slow parts: a missing package or a dead MLflow server fails at once
    cache = cache_root(recipe.data.cache_dir)
    hub.use_pins(Path(recipe.output_dir))  # a resume or a submitted job reads the commits its run dir recorded
    path = model_dir(recipe.model, cache)
    tokenizer = load_tokenizer(path, recipe.model)
    classify = recipe.task.type == "classification"
    end_of_turn = tokenizer.eos_token or "?"
    if not classify and recipe.data.format in ("messages", "sharegpt") and not tokenizer.chat_template:
        raise UserError(
            f"data.format: messages needs a chat template, and the tokenizer in {path} has none. Use an instruct/chat "
            "model, add a chat_template to its tokenizer_config.json, or use data.format: completion."
        )
    if tokenizer.chat_template and (recipe.data.format in ("messages", "sharegpt", "alpaca") or classify):
        try:
            end_of_turn = end_of_turn_check(tokenizer, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
        except TemplateError as e:
            raise UserError(f"model.path: {e}.") from None
    prepared = prepare(recipe.data, tokenizer, cache, recipe.seed, recipe.task)
    labels = sequence_labels(prepared.classes)
    config = _model_config(path, recipe, labels, tokenizer.pad_token_id)
    skeleton = _meta_model(config, recipe, labels)  # the class training builds, without weights
    warnings = check_positions(config, recipe, prepared)
    t = recipe.train
    if (t.eval_every or t.eval_generate or t.eval_at_start) and prepared.eval is None:
        raise UserError("train.eval_every / eval_generate / eval_at_start need eval data: set data.eval_files or data.eval_fraction.")
    world = recipe.launch.nproc_per_node * recipe.launch.nnodes
    lengths = packed.example_lengths(prepared.train)
    try:
        schedule = make_schedule(t, recipe.seed, recipe.data.shuffle, len(prepared.train), world, lengths)
        unpacked_padding = padding_waste(schedule.batches, np.asarray(lengths))
        packing = packed.enabled(recipe, unpacked_padding)
        if packing:
            packed_attention_check(skeleton, recipe)
            schedule = make_schedule(t, recipe.seed, recipe.data.shuffle, len(prepared.train), world, lengths, packed.budget(recipe))
    except ValueError as e:
        raise UserError(str(e)) from None
    check_strategy(recipe, schedule.batches.accumulation)
    check_attention(recipe, cuda=torch.cuda.is_available() if here else None)
    if recipe.strategy.backend == "fsdp":
        from launcher.engines.fsdp import check_wrap_classes

        check_wrap_classes(skeleton, recipe)
    trainable = check_lora(config, recipe, labels) if recipe.lora.enabled else None
    lengths = prepared.train.select(range(min(len(prepared.train), 2000)))["input_ids"]
    params = sum(p.numel() for p in skeleton.parameters())
    train_lengths = row_lengths(prepared.train)
    return Plan(
        model_path=path,
        architecture=type(skeleton).__name__,
        params=params,
        trainable=trainable,
        classes=prepared.classes,
        dtype=recipe.model.dtype,
        end_of_turn=end_of_turn,
        world_size=world,
        schedule=schedule,
        train_examples=len(prepared.train),
        eval_examples=len(prepared.eval) if prepared.eval is not None else 0,
        mean_tokens=sum(len(x) for x in lengths) / len(lengths),
        files=prepared.stats,
        mixture=prepared.mixture,
        warnings=warnings,
        padding=padding_waste(schedule.batches, train_lengths),
        unpacked_padding=unpacked_padding,
        memory=memory_setup(recipe, config, skeleton, params, trainable, schedule.batches, world, labels is not None,
                            int(train_lengths.max())),
    )


def _task(recipe: Recipe, classes) -> str:
    if classes is None:
        return f"sft on data.format {recipe.data.format}"
    t = recipe.task
    head = ("head lm: the label answers task.prompt; predictions score every label" if t.head == "lm"
            else "head sequence: a classification head on the model" + (f", class weights {list(classes.weights)}" if t.class_weights else ""))
    return f"classification of `{t.text_field}` into `{t.label_field}`: {len(classes.names)} classes ({', '.join(classes.names)}) from {classes.source}; {head}"


def _strategy(recipe: Recipe) -> str:
    st = recipe.strategy
    if st.backend == "deepspeed":
        offload = [name for name, on in (("optimizer", st.offload_optimizer), ("parameters", st.offload_params)) if on]
        return f"deepspeed ZeRO-{st.zero_stage}" + (f", {' and '.join(offload)} offloaded to CPU" if offload else "")
    if st.backend == "fsdp":
        wrap = ", ".join(st.fsdp_wrap) or "the model's blocks"
        return f"fsdp2 (shard {wrap}; reshard_after_forward {st.reshard_after_forward}{', CPU offload' if st.cpu_offload else ''})"
    return st.backend


def _lora(recipe: Recipe, plan: Plan) -> str:
    if plan.trainable is None:
        return "off (full fine-tuning: every weight is trained)"
    lo = recipe.lora
    variant = "".join([", rsLoRA" if lo.use_rslora else "", ", DoRA" if lo.use_dora else ""])
    return (f"r {lo.r}, alpha {lo.alpha:g}, dropout {lo.dropout:g} on {', '.join(lo.target_modules)}{variant}: "
            f"{plan.trainable / 1e6:.2f}M trainable parameters ({100 * plan.trainable / plan.params:.2f}% of the model)")


def _weighted(recipe: Recipe) -> bool:
    return any(s.weight is not None or s.fraction is not None for s in recipe.data.sources)


def _packing(recipe: Recipe, b, unpacked_padding: float) -> str:
    from launcher.attention import for_training

    if not b.pack_tokens:
        why = "data.packing: false" if recipe.data.packing is False else (
            "classification" if recipe.task.type == "classification" else
            f"model.attn_implementation {recipe.model.attn_implementation}" if not packed.allowed(recipe) else
            f"data.packing unset and padded micro-batches are only {100 * unpacked_padding:.0f}% padding, "
            f"under {100 * packed.AUTO_MIN_PADDING:.0f}%: packing would save little")
        return f"off ({why}); micro-batches group examples of similar length within each step"
    attn = for_training(recipe.model.attn_implementation, True)
    how = "sdpa per example" if attn == "sft_sdpa" else "eager per example" if attn == "sft_eager" else f"{attn} (varlen)"
    return (f"on: each rank's examples of a step packed into padding-free rows of at most {b.pack_tokens} tokens, "
            f"the same number per rank; attention {how}, never across examples")


def format_plan(plan: Plan, recipe: Recipe) -> str:
    s, b = plan.schedule, plan.schedule.batches
    lines = [
        f"model        {recipe.model.path} ({plan.architecture}, {plan.params / 1e6:.2f}M parameters, dtype {plan.dtype})",
        *[f"             Hub {r.kind} {r.repo} revision {r.revision} = commit {r.commit}, in {r.path}" for r in hub.resolved()],
        *([f"             end-of-turn token {plan.end_of_turn!r} is trained so the model learns to stop"] if sequence_labels(plan.classes) is None else []),
        f"task         {_task(recipe, plan.classes)}",
        f"lora         {_lora(recipe, plan)}",
        f"strategy     {_strategy(recipe)}, world size {plan.world_size} ({recipe.launch.nproc_per_node} per node x {recipe.launch.nnodes} nodes)",
        f"batch        micro {b.micro_batch_size} x accumulation {b.accumulation} x {b.world_size} ranks = global {b.global_batch} sequences"
        f" (~{b.global_batch * plan.mean_tokens:,.0f} tokens, mean {plan.mean_tokens:.0f} per sequence)",
        f"steps        {b.steps_per_epoch} per epoch, {s.total_steps} total, {s.warmup_steps} warmup ({recipe.train.lr_scheduler}, lr {recipe.train.lr:g})",
        f"data         {plan.train_examples} train / {plan.eval_examples} eval examples, "
        f"{'format ' + recipe.data.format if recipe.task.type == 'sft' else 'fields ' + recipe.task.text_field + ' and ' + recipe.task.label_field}, "
        f"max_seq_len {recipe.data.max_seq_len}",
    ]
    for f in plan.files:
        lines.append(
            f"             {f.file}: {f.rows} rows, {f.kept} kept, {f.truncated} truncated, "
            f"{f.dropped_too_long} dropped as too long, {f.dropped_no_target} with no target tokens"
        )
        if f.lengths is not None and len(f.lengths):
            lines.append(f"               {length_summary(f.lengths)}; {100 * f.target_tokens / max(int(f.lengths.sum()), 1):.0f}% of its tokens are trained targets")
    for m in plan.mixture if plan.mixture and len(plan.mixture) > 1 or _weighted(recipe) else []:
        lines.append(f"             mixture: {m.label}: {m.rows} rows, {m.tokens:,} tokens, {100 * m.share:.1f}% of the mixture")
    how = "packed rows" if b.pack_tokens else "each padded to its longest row"
    lines.append(f"             padding: {100 * plan.padding:.0f}% of the planned micro-batches' token slots ({how})")
    skipped = plan.train_examples - b.steps_per_epoch * b.global_batch
    if skipped:
        lines.append(f"             {skipped} examples per epoch do not fill a global batch and are skipped (a different set each epoch when shuffled)")
    lines.append(f"packing      {_packing(recipe, b, plan.unpacked_padding)}")
    if recipe.train.loss_chunk_tokens:
        lines.append(f"loss         cross-entropy in chunks of {recipe.train.loss_chunk_tokens} target tokens (no full float32 logits)")
    lines += [f"warning      {w}" for w in plan.warnings]
    lines += describe(plan.memory, *gpu_memory(recipe))
    lines.append(f"output_dir   {recipe.output_dir}")
    return "\n".join(lines)


__all__ = ["Plan", "make_plan", "format_plan", "FIELDS"]
