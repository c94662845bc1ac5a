"""Recipes: the schema (typed OmegaConf structured dataclasses, a comment on each field) and
`load_recipe`, which merges a recipe's sources over the schema's defaults, resolves `${...}`
interpolations once and validates the result (launcher/recipe_checks.py), and `to_dict` for
saving it. Reading the YAML files, their `extends:` bases and the `key=value` overrides, and
the messages that name the source of a mistake, are launcher/recipe_files.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf import errors as oc_errors

from launcher.errors import RecipeError
from launcher.recipe_files import layers, merge, type_message


@dataclass
class ModelConfig:
    # a local Hugging Face model directory, a Hub id (ORG/NAME, downloaded once into the HF cache before
    # the workers start; safetensors only), or builtin:tiny-llama / builtin:tiny-qwen2
    path: str = MISSING
    # Hub ids: a branch, tag or commit (default main); the commit it names is recorded in the run dir (hub.json)
    revision: Optional[str] = None
    # auto: bfloat16 on GPU, float32 on CPU
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None


@dataclass
class SourceConfig:
    # a local data file (.jsonl .json .parquet .csv) or a Hub dataset id (ORG/NAME)
    path: str = MISSING
    # Hub datasets: the split, the subset (config name) and a branch, tag or commit (default main)
    split: str = "train"
    subset: Optional[str] = None
    revision: Optional[str] = None
    # this source's share of the training mixture, relative to the other sources' weights (give every
    # source one, or none); unset: every row, once
    weight: Optional[float] = None
    # or: this fraction of the source's rows (0.5 half of them, 2.0 each row twice)
    fraction: Optional[float] = None
    # the row format (default data.format) and {field the format reads: column of this data}, e.g. {messages: conversation}
    format: Optional[str] = None
    columns: Dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    # local training files, each read whole in data.format; data.sources for Hub datasets, weights, formats
    train_files: List[str] = field(default_factory=list)
    sources: List[SourceConfig] = field(default_factory=list)
    eval_files: List[str] = field(default_factory=list)
    # held out from the training files when eval_files is empty
    eval_fraction: float = 0.0
    # messages | sharegpt | alpaca | completion | text (messages rows may carry tool calls and a `tools` column)
    format: str = "messages"
    max_seq_len: int = 2048
    # what to do with longer sequences: truncate | drop | error
    too_long: str = "truncate"
    shuffle: bool = True
    # pack each rank's examples of a step into padding-free rows (unset: for task.type sft when padded
    # micro-batches would be >= 10% padding; never for classification); attention never crosses examples
    packing: Optional[bool] = None
    # tokens per packed micro-batch; unset: train.micro_batch_size x max_seq_len (a full padded micro-batch)
    pack_tokens: Optional[int] = None
    # processes that tokenize (once per node, cached); unset: one per core for files of 20k rows or more
    num_proc: Optional[int] = None
    # tokenized datasets and built-in models; default: $XDG_CACHE_HOME/sft-launcher
    cache_dir: Optional[str] = None


@dataclass
class TaskConfig:
    # sft: supervised fine-tuning on the formats of `data.format` | classification: rows of text + label
    type: str = "sft"
    # classification: lm (the label is the model's answer to `prompt`; predictions score every label) |
    # sequence (AutoModelForSequenceClassification: a new head on the last non-pad token, or an encoder's)
    head: str = "lm"
    text_field: str = "text"
    label_field: str = "label"
    # the classes, in order; empty: every value of label_field in the training files, sorted
    labels: List[str] = field(default_factory=list)
    # head lm: the user turn (or, without a chat template, the text before the label); {text} and {labels}
    prompt: str = "Classify the text as one of: {labels}.\n\nText: {text}"
    # head sequence: per-class loss weights, in the order of `labels` (e.g. for imbalanced data); empty: all 1
    class_weights: List[float] = field(default_factory=list)


@dataclass
class LoraConfig:
    # train low-rank adapters (peft) instead of every weight; the base stays frozen
    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # module names (e.g. [q_proj, v_proj]) or [all-linear]: every linear layer but the output head
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # modules trained in full next to the adapters (e.g. [lm_head], or a new classification head)
    modules_to_save: List[str] = field(default_factory=list)
    # rsLoRA: scale by alpha/sqrt(r) instead of alpha/r
    use_rslora: bool = False
    # DoRA: weight-decomposed LoRA (slower; adds a magnitude vector per adapted layer)
    use_dora: bool = False


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
    # prompts decoded together (left-padded, KV cache, in lockstep across ranks); 0: micro_batch_size;
    # 1 decodes one prompt at a time
    eval_generate_batch_size: int = 0
    # also evaluate before the first step, to see where training started from
    eval_at_start: bool = False
    # compute the loss from hidden states in chunks of this many target tokens, so a micro-batch's
    # [tokens x vocab] float32 logits never exist at once; 0: the model's full logits
    loss_chunk_tokens: int = 1024


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
    # save every N optimizer steps (0: off); the end of training always saves
    every_steps: int = 0
    # save when this many minutes of training have passed since the last save (0: off); rank 0's clock
    # decides, so a kill costs at most this much work whatever a step takes
    every_minutes: float = 30.0
    # complete checkpoints kept; older ones are removed once a newer one is complete
    keep_last: int = 2
    # auto: continue from output_dir's latest checkpoint when it has one | never: refuse a run dir
    # with checkpoints | a path: start from that checkpoint (or run dir's latest)
    resume: str = "auto"
    # after SIGTERM/SIGUSR1, seconds to finish the step and save before stopping without a checkpoint
    signal_grace_s: float = 180.0


@dataclass
class ExportConfig:
    # export the last checkpoint to output_dir/final when training finishes
    on_finish: bool = True
    # auto: the training dtype (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    dtype: str = "auto"
    # safetensors files are split at this size (transformers' notation: 5GB, 500MB)
    max_shard_size: str = "5GB"
    # how many eval (or train) sequences the export's logit check runs
    verify_prompts: int = 4
    # largest allowed |logit difference| to the training-time model; auto: 1e-3 for float32,
    # 5% of the largest |logit| for 16-bit exports (rounding the weights moves logits that much)
    verify_tolerance: Optional[float] = None


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1
    # multi-node: the number of nodes, this node's rank (node 0 hosts the c10d rendezvous and prepares
    # output_dir, which every node must see), and node 0's HOST:PORT, the same on every node
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: Optional[str] = None
    # restarts of the whole worker group by the elastic agent after a worker dies
    max_restarts: int = 0
    # extra environment variables for the workers (e.g. NCCL_SOCKET_IFNAME, NCCL_DEBUG)
    env: Dict[str, str] = field(default_factory=dict)
    # how long a collective may wait for a peer before the run fails (a dead or hung node)
    collective_timeout_s: int = 1800
    # GPU memory per rank that `sft plan` checks the memory estimate against (default: the detected GPU's)
    gpu_memory_gib: Optional[float] = None


@dataclass
class SlurmConfig:
    # `sft submit`: one srun task per node, each running `sft run` with launch.nproc_per_node ranks
    nodes: int = 1
    # GPUs per node (--gpus-per-node); 0 on CPU-only clusters
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    # e.g. 200G (--mem), 01-00:00:00 or 4:00:00 (--time)
    mem: Optional[str] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    # more directives, each written after `#SBATCH ` as given, e.g. ["--reservation=big"]
    extra_sbatch: List[str] = field(default_factory=list)
    # exported in the job before srun; and shell lines run first (module load, source venv, ...)
    env: Dict[str, str] = field(default_factory=dict)
    setup: List[str] = field(default_factory=list)
    # srun options before the command, e.g. ["--container-image=nvcr.io/...#tag"] for pyxis
    srun_args: List[str] = field(default_factory=list)
    # seconds before the time limit at which Slurm sends SIGUSR1 (checkpoint, then requeue)
    signal_before_end_s: int = 300
    # a template of your own instead of slurm/sft.sbatch (same ${variables})
    template: Optional[str] = None


@dataclass
class LoggingConfig:
    every_steps: int = 1
    # experiment trackers on rank 0, each an extra (pip install 'sft-launcher[tensorboard]'): tensorboard | wandb | mlflow
    report_to: List[str] = field(default_factory=list)
    # wandb: project (default sft-launcher), entity, mode online | offline | disabled (default: $WANDB_MODE, else online)
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[str] = None
    # mlflow: tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's own) and experiment (default sft-launcher)
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment: Optional[str] = None


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


def load_recipe(path: str | Path, overrides: Optional[List[str]] = None) -> Recipe:
    """Load, merge, validate and resolve a recipe. Raises RecipeError for user mistakes."""
    cfg = OmegaConf.structured(Recipe)
    for source, layer in layers(Path(path), overrides):
        cfg = merge(cfg, layer, source, Recipe)
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise RecipeError(f"{path}: required key(s) not set: {', '.join(missing)}. Add them to the recipe or pass key=value.")
        recipe = OmegaConf.to_object(cfg)
    except oc_errors.InterpolationResolutionError as e:
        raise RecipeError(f"{path}: could not resolve `{getattr(e, 'full_key', '')}`: {str(e).splitlines()[0]}.") from None
    except oc_errors.ValidationError as e:
        raise RecipeError(type_message(str(path), e)) from None
    from launcher.recipe_checks import validate

    validate(recipe)
    return recipe


def to_dict(recipe: Recipe) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)
