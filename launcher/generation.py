"""Batched decoding: left-padded prompts, KV cache, each row stopping at its end-of-turn token.

Under ZeRO-3 and FSDP2 every forward is a collective, and rows that stop early would leave a
rank's `generate` with fewer forwards than its peers' (a deadlock). So whenever more than one
rank runs, decoding is in lockstep: transformers' `synced_gpus=True`, passed explicitly, keeps a
finished rank running dummy forwards until every rank is done. We never rely on transformers
detecting the engine (a deleted HfDeepSpeedConfig hides ZeRO-3 from it). Callers must also call
`generate` the same number of times on every rank (equal-length shards, see evaluate.py).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from transformers import GenerationConfig


def lockstep(dist) -> bool:
    """Decode in lockstep across ranks: always when there are peers (it costs one tiny all-reduce
    per token on ddp, and keeps results and control flow the same on every engine)."""
    return bool(dist is not None and dist.distributed and dist.world_size > 1)


def stop_ids(module, tokenizer=None) -> List[int]:
    """The tokens that end a reply: the generation config's eos ids (the end-of-turn token for chat
    models), and the tokenizer's eos."""
    config = getattr(module, "generation_config", None)
    stop = getattr(config, "eos_token_id", None)
    stop = [stop] if isinstance(stop, int) else list(stop or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    return stop


def left_pad(prompts: List[List[int]], pad_id: int, device) -> tuple:
    """(input_ids, attention_mask) with each prompt right-aligned; generate derives position ids
    from the mask, so a padded row is decoded as if it were alone."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def _cut(row: List[int], stop: List[int]) -> List[int]:
    """A generated row up to and including its first stop token (what follows is padding)."""
    for k, t in enumerate(row):
        if t in stop:
            return row[: k + 1]
    return row


@torch.no_grad()
def generate(module, prompts: List[List[int]], max_new_tokens: int, pad_id: int, stop: List[int], device, synced: bool,
             temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None) -> List[List[int]]:
    """The new tokens of each prompt (a batch), ending at the first stop token or after
    max_new_tokens. Greedy when temperature is 0. `synced`: lockstep with the other ranks."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: an empty prompt (every row needs at least one token)")
    ids, mask = left_pad(prompts, pad_id, device)
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max(int(max_new_tokens), 1), do_sample=sample, eos_token_id=stop or None, pad_token_id=pad_id, use_cache=True,
        **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {}),
    )
    if sample and seed is not None:
        torch.manual_seed(seed)
    out = module.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced)
    return [_cut(row, stop) for row in out[:, ids.size(1):].tolist()]


def batched(items: list, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), max(size, 1))]
