"""Built-in tiny models, made locally so the quickstart and the tests need no download.

`builtin:NAME` in `model.path` materialises a randomly initialised model of a real
architecture (seeded, so identical on every machine with the same torch) together with
the byte-level BPE tokenizer shipped in this folder, as an ordinary Hugging Face model
directory in the cache. Everything downstream then treats it like any local model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
PREFIX = "builtin:"
# Bump when a config or the tokenizer changes, so cached copies are rebuilt.
VERSION = 2

_SHAPES = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def _config(name: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    if name == "tiny-llama":
        return LlamaConfig(**_SHAPES, **ids)
    if name == "tiny-qwen2":
        return Qwen2Config(**_SHAPES, **ids)
    raise KeyError(name)


NAMES = ("tiny-llama", "tiny-qwen2")


def is_builtin(path: str) -> bool:
    return path.startswith(PREFIX)


def materialize(path: str, cache: Path) -> Path:
    """The local directory of built-in model `builtin:NAME`, creating it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    name = path[len(PREFIX):]
    if name not in NAMES:
        raise ValueError(f"unknown built-in model {path!r}; built-ins are: {', '.join(PREFIX + n for n in NAMES)}")
    target = cache / "builtin" / f"{name}-v{VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # ranks and concurrent runs build it once
        if (target / "config.json").exists():
            return target
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(name, tokenizer), dtype=torch.float32)
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.generation_config = GenerationConfig(
            eos_token_id=[end_of_turn, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-written model is never seen as ready
        shutil.rmtree(tmp, ignore_errors=True)
    return target
