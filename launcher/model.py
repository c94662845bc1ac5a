"""Load the model and tokenizer named by the recipe's `model` section."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher import builtin
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
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise UserError(
            f"model.path: {cfg.path} is not a directory. Give a local Hugging Face model directory "
            f"(with config.json), or one of {', '.join(builtin.PREFIX + n for n in builtin.NAMES)}."
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


def load_model(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, weights: bool = True):
    """The model from `path`; with weights=False its parameters are on the meta device (no memory,
    no file read) for an engine that fills them from another rank. Buffers stay real: some, such
    as rotary frequencies, are computed at construction and are not in the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if weights:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    else:
        from accelerate import init_empty_weights

        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        model.tie_weights()  # not done on meta; ranks must see the same parameter list as rank 0
        for module in model.modules():  # parameters stay on meta; buffers go where training runs
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the KV cache is for generation, not training
    return model
