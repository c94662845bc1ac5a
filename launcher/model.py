"""Load the model and tokenizer named by the recipe's `model` section."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from launcher import builtin, hub
from launcher.errors import UserError
from launcher.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(cfg: ModelConfig, cache: Path) -> Path:
    """The local model directory; built-ins are materialised into the cache first."""
    if builtin.is_builtin(cfg.path):
        try:
            return builtin.materialize(cfg.path, cache)
        except ValueError as e:
            raise UserError(f"model.path: {e}.") from None
    if hub.is_hub_id(cfg.path):
        return Path(hub.resolve("model", cfg.path, cfg.revision, "model.path", cfg.trust_remote_code).path)
    if cfg.revision:
        raise UserError(f"model.revision: {cfg.revision!r} is set but model.path {cfg.path} is not a Hub id (ORG/NAME); a local directory has no revisions. Remove model.revision.")
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise UserError(
            f"model.path: {cfg.path} is not a directory. Give a local Hugging Face model directory "
            f"(with config.json), a Hub id (ORG/NAME), or one of {', '.join(builtin.PREFIX + n for n in builtin.NAMES)}."
        )
    if not (path / "config.json").is_file():
        raise UserError(f"model.path: {cfg.path} has no config.json, so it is not a Hugging Face model directory.")
    return path


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_tokenizer(path: Path, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer.is_fast:
        raise UserError(f"model.path: the tokenizer in {path} is not a fast tokenizer; sft-launcher needs one (for character offsets).")
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(sequence_labels: Optional[List[str]] = None):
    """AutoModelForSequenceClassification for a sequence classifier, else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if sequence_labels else AutoModelForCausalLM


def head_config(sequence_labels: Optional[List[str]], pad_token_id: Optional[int]) -> dict:
    """Config fields of a sequence classifier: its labels (what the exported config serves as
    id2label) and the pad token, which decoder models need to find each row's last real token."""
    if not sequence_labels:
        return {}
    return dict(
        num_labels=len(sequence_labels),
        id2label=dict(enumerate(sequence_labels)),
        label2id={name: i for i, name in enumerate(sequence_labels)},
        problem_type="single_label_classification",
        pad_token_id=pad_token_id,
    )


def load_model(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, weights: bool = True,
               sequence_labels: Optional[List[str]] = None, pad_token_id: Optional[int] = None, packing: bool = False):
    """The model from `path`; with weights=False its parameters are on the meta device (no memory,
    no file read) for an engine that fills them from another rank. Buffers stay real: some, such
    as rotary frequencies, are computed at construction and are not in the checkpoint.
    `sequence_labels`: a sequence classifier with these classes (its head is new unless `path` has one).
    `packing`: trained on packed rows, with attention that keeps their examples apart (launcher/attention.py)."""
    from transformers import AutoConfig

    from launcher.attention import for_training

    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    attn = for_training(cfg.attn_implementation, packing)
    if attn:
        kwargs["attn_implementation"] = attn
    cls = model_class(sequence_labels)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **head_config(sequence_labels, pad_token_id))
    if weights:
        model = cls.from_pretrained(path, config=config, **kwargs).to(device)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, **kwargs)
        model.tie_weights()  # not done on meta; ranks must see the same parameter list as rank 0
        for module in model.modules():  # parameters stay on meta; buffers go where training runs
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(device)
    model.config.use_cache = False  # the KV cache is for generation, not training
    return model


def lora_config(lora, model=None):
    """peft's LoraConfig for the recipe's `lora` section. For a sequence classifier peft also trains
    the new classification head in full (it adds `score` / `classifier` to modules_to_save)."""
    from peft import LoraConfig

    targets = list(lora.target_modules)
    sequence = model is not None and type(model).__name__.endswith("ForSequenceClassification")
    return LoraConfig(
        task_type="SEQ_CLS" if sequence else "CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=list(lora.modules_to_save) or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


@contextlib.contextmanager
def quiet_peft():
    """peft's PeftModel reads transformers 5's deprecated is_gradient_checkpointing: a FutureWarning
    in every plan, rank and export otherwise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, lora, adapter_dtype_follows_base: bool = False):
    """Wrap `model` with fresh LoRA adapters; only they (and modules_to_save) stay trainable.

    peft keeps adapters in fp32 over a bf16 base by default, which is right when the engine
    trains the module as it is (ddp, fsdp). DeepSpeed casts the module to the training dtype and
    keeps its own fp32 master copy, and under ZeRO-3 fp32 adapters meet bf16 activations
    (dtype errors), so there the adapters follow the base dtype (adapter_dtype_follows_base)."""
    from peft import get_peft_model

    # Named before peft wraps them (a failed get_peft_model leaves base_layer / default behind).
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    fused = fused_expert_parameters(model)
    config = lora_config(lora, model)
    targets = set(lora.target_modules)
    if fused and config.lora_dropout and (targets == {"all-linear"} or targets & MOE_TARGETS):
        # peft adapts fused expert weights (3-D parameters, transformers 5) with lora.ParamWrapper, which has
        # no dropout; one LoraConfig cannot give the linear layers dropout and the experts none.
        _note(f"lora: this model's experts are fused parameters ({', '.join(fused)}); peft adapts them without dropout, "
              f"so lora.dropout {lora.dropout:g} is trained as 0. Set lora.dropout: 0 to say so, or list lora.target_modules "
              f"(e.g. [{', '.join(n for n in linear if n not in OUTPUT_HEADS)}]) to adapt only the linear layers with dropout.")
        config.lora_dropout = 0.0
    try:
        with quiet_peft():
            return get_peft_model(model, config, autocast_adapter_dtype=not adapter_dtype_follows_base)
    except ValueError as e:
        experts = f" Its fused expert weights (adapted as parameters) are: {', '.join(fused)}." if fused else ""
        raise UserError(
            f"lora.target_modules / lora.modules_to_save: {str(e).splitlines()[0]} "
            f"The model's linear layers are named: {', '.join(linear)}.{experts} Use some of those, or [all-linear]."
        ) from None


# Module names peft maps onto fused experts (transformers 4's per-expert linears and the router).
MOE_TARGETS = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate"}
OUTPUT_HEADS = ("lm_head", "score", "classifier")
_noted = set()


def _note(text: str) -> None:
    import sys

    if text not in _noted:
        _noted.add(text)
        print(f"note: {text}", file=sys.stderr, flush=True)


def fused_expert_parameters(model) -> List[str]:
    """Names (module.param, deduplicated over layers) of 3-D weights: a mixture of experts stored fused.
    ZeRO-3 partitions parameters into 1-D tensors: their shape is ds_shape."""
    names = set()
    for name, p in model.named_parameters():
        if len(getattr(p, "ds_shape", p.shape)) == 3:
            parts = name.split(".")
            names.add(".".join(parts[-2:]))
    return sorted(names)


def enable_gradient_checkpointing(model, reentrant: bool) -> None:
    """Recompute activations in backward. With LoRA the embeddings are frozen, so the checkpointed
    blocks' inputs need requires_grad, or reentrant checkpointing would drop the adapters' gradients."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()


def materialize(model, device) -> None:
    """Give a meta-device skeleton (load_model(weights=False)) real, uninitialised storage on
    `device`, keeping its buffers' values (to_empty would drop them). Tied weights stay tied."""
    buffers = {name: b for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, b in buffers.items():
        model.get_buffer(name).copy_(b)
