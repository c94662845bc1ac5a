"""Write the trained model as a Hugging Face directory that transformers and vLLM load as is."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import GenerationConfig


def end_of_turn_ids(tokenizer, model_config) -> list:
    """The ids generation should stop at: the model's EOS ids plus the chat template's end-of-turn token."""
    from launcher.data.tokenize import tokenize_conversation

    ids = model_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        sample = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        enc = tokenize_conversation(tokenizer, sample)
        ids.append(enc["input_ids"][enc["reply_end"] - 1])
    return sorted(set(ids))


def save_final(module, state_dict: dict, tokenizer, out_dir: Path) -> Path:
    """Save model + tokenizer to out_dir via a temporary directory, so a crash never leaves half a model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    base = module.generation_config if module.generation_config is not None else GenerationConfig()
    base.eos_token_id = end_of_turn_ids(tokenizer, module.config)
    base.pad_token_id = tokenizer.pad_token_id
    module.generation_config = base
    module.config.use_cache = True  # we turned it off for training; serving wants it
    module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
