"""Recipes: typed OmegaConf structured configs, loaded from YAML + dotlist overrides.

A recipe is merged in this order: its `extends:` base (recursively), the file itself,
then `key=value` overrides. Each source is merged separately so an error can name the
file (or the override) that caused it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from launcher.errors import RecipeError


@dataclass
class ModelConfig:
    # a local Hugging Face model directory, or builtin:tiny-llama / builtin:tiny-qwen2
    path: str = MISSING
    # auto: bfloat16 on GPU, float32 on CPU
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None


@dataclass
class DataConfig:
    train_files: List[str] = MISSING
    eval_files: List[str] = field(default_factory=list)
    # held out from the training files when eval_files is empty
    eval_fraction: float = 0.0
    # messages | alpaca | completion | text
    format: str = "messages"
    max_seq_len: int = 2048
    # what to do with longer sequences: truncate | drop | error
    too_long: str = "truncate"
    shuffle: bool = True
    # tokenized datasets and built-in models; default: $XDG_CACHE_HOME/sft-launcher
    cache_dir: Optional[str] = None


@dataclass
class TaskConfig:
    # sft: supervised fine-tuning on the formats of `data.format`
    type: str = "sft"


@dataclass
class LoraConfig:
    enabled: bool = False


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    # set one of these two; global = micro * accumulation * world size
    gradient_accumulation_steps: Optional[int] = None
    global_batch_size: Optional[int] = None
    epochs: float = 1.0
    # > 0 overrides epochs
    max_steps: int = -1
    lr: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # evaluate every N optimizer steps (0: only at the end)
    eval_every: int = 0
    # greedy-decode this many eval conversations and report exact match of the final reply
    eval_generate: int = 0
    # also evaluate before the first step, to see where training started from
    eval_at_start: bool = False


@dataclass
class StrategyConfig:
    # ddp | fsdp | deepspeed
    backend: str = "ddp"
    # deepspeed: ZeRO stage 0-3; offload the optimizer state (stages 1-3) / the parameters (stage 3) to CPU
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # deepspeed: a JSON/YAML path or a mapping merged over the config generated from the recipe
    deepspeed_config: Optional[Any] = None
    # fsdp: module classes to shard one by one (default: the model's _no_split_modules, e.g. LlamaDecoderLayer)
    fsdp_wrap: List[str] = field(default_factory=list)
    # fsdp: free gathered parameters after forward (ZeRO-3-like); false keeps them until backward (ZeRO-2-like)
    reshard_after_forward: bool = True
    # fsdp: keep sharded parameters, gradients and optimizer state in CPU memory
    cpu_offload: bool = False


@dataclass
class CheckpointConfig:
    pass


@dataclass
class ExportConfig:
    # write the trained model to output_dir/final when training finishes
    on_finish: bool = True


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1
    # restarts of the whole worker group by the elastic agent after a worker dies
    max_restarts: int = 0
    # extra environment variables for the workers
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class SlurmConfig:
    pass


@dataclass
class LoggingConfig:
    every_steps: int = 1


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/${name}"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"Recipe file {path} does not exist. Check the path (it is relative to the current directory).")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}. Fix the YAML at that position.") from None
    if not isinstance(data, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections (model:, data:, train:, ...), not a list or a scalar.")
    return data


def _keys_at(dotted: str) -> List[str]:
    """The valid keys of the schema section at a dotted path ('' for the top level)."""
    node = OmegaConf.structured(Recipe)
    node = OmegaConf.select(node, dotted) if dotted else node
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _unknown_key_message(source: str, full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    valid = _keys_at(parent)
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f" Did you mean `{parent + '.' if parent else ''}{close[0]}`?" if close else ""
    where = f"`{parent}`" if parent else "the top level"
    listing = f" Valid keys in {where}: {', '.join(valid)}." if valid else f" {where} takes no settings yet."
    return f"{source}: unknown key `{full_key}`.{hint}{listing}"


def _type_message(source: str, e: oc_errors.OmegaConfBaseException) -> str:
    key = str(getattr(e, "full_key", "") or "?")
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    return f"{source}: wrong type for `{key}`: {msg}. Give `{key}` a value of the type its default has (see recipes/quickstart.yaml)."


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except oc_errors.ConfigKeyError as e:
        raise RecipeError(_unknown_key_message(source, str(e.full_key))) from None
    except oc_errors.ValidationError as e:
        raise RecipeError(_type_message(source, e)) from None


def _load_with_bases(path: Path, seen: List[Path]) -> List[tuple]:
    """[(source name, config)] from the deepest base to this file."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + [path])
        raise RecipeError(f"Recipe `extends:` loop: {chain}. Remove one of the `extends:` lines.")
    data = _read_yaml(path)
    base = data.pop("extends", None) if "extends" in data else None
    layers = []
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: `extends` must be the path of a base recipe (a string).")
        layers = _load_with_bases((path.parent / base), seen + [path])
    return layers + [(str(path), data)]


def load_recipe(path: str | Path, overrides: Optional[List[str]] = None) -> Recipe:
    """Load, merge, validate and resolve a recipe. Raises RecipeError for user mistakes."""
    cfg = OmegaConf.structured(Recipe)
    for source, layer in _load_with_bases(Path(path), []):
        cfg = _merge(cfg, layer, source)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"Override `{item}` is not of the form key=value (e.g. train.max_steps=40).")
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as e:  # omegaconf raises several types for bad dotlists
            raise RecipeError(f"Override `{item}` could not be parsed: {e}.") from None
        cfg = _merge(cfg, dot, f"override `{item}`")
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise RecipeError(f"{path}: required key(s) not set: {', '.join(missing)}. Add them to the recipe or pass key=value.")
        recipe = OmegaConf.to_object(cfg)
    except oc_errors.InterpolationResolutionError as e:
        raise RecipeError(f"{path}: could not resolve `{getattr(e, 'full_key', '')}`: {str(e).splitlines()[0]}.") from None
    except oc_errors.ValidationError as e:
        raise RecipeError(_type_message(str(path), e)) from None
    validate(recipe)
    return recipe


_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.format": ("messages", "alpaca", "completion", "text"),
    "data.too_long": ("truncate", "drop", "error"),
    "task.type": ("sft",),
    "strategy.backend": ("ddp", "fsdp", "deepspeed"),
}


def _get(recipe: Recipe, dotted: str):
    obj: Any = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(recipe: Recipe) -> None:
    """Checks on values alone (no files, no model): the rest is in plan.py."""
    for key, choices in _CHOICES.items():
        value = _get(recipe, key)
        if value not in choices:
            raise RecipeError(f"`{key}: {value}` is not one of {', '.join(choices)}.")
    positive = ["train.micro_batch_size", "data.max_seq_len", "launch.nproc_per_node", "logging.every_steps"]
    for key in positive:
        if _get(recipe, key) < 1:
            raise RecipeError(f"`{key}` must be at least 1, got {_get(recipe, key)}.")
    t = recipe.train
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
    if recipe.lora.enabled:
        raise RecipeError("`lora.enabled: true` is not available in this version yet; set it to false.")


# Keys whose values are secrets, and values that look like well-known token formats.
_SECRET_KEY = re.compile(r"(?i)(^|_)(token|secret|passw(or)?d|api_?key|access_?key|private_?key|credentials?|auth)$|^(hf|wandb|github|gh)_?token$")
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[bp]-[A-Za-z0-9-]{10,})$")
REDACTED = "***REDACTED***"


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (REDACTED if isinstance(v, str) and _SECRET_KEY.search(str(k)) else _redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    if isinstance(node, str) and _SECRET_VALUE.match(node):
        return REDACTED
    return node


def to_dict(recipe: Recipe) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)


def to_yaml(recipe: Recipe, redact: bool = True) -> str:
    data = to_dict(recipe)
    return OmegaConf.to_yaml(OmegaConf.create(_redact(data) if redact else data))
