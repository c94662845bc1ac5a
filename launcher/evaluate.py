"""Evaluation: loss, perplexity and token accuracy on the eval set, and exact match by generation.

Every rank evaluates an equal-length shard (short shards are padded with a row whose
labels are all ignored), so all ranks run the same number of forward passes: sharded
engines need that. Sums are all-reduced, so the numbers do not depend on world size.
"""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig

from launcher.data.batches import pad_collate
from launcher.data.tokenize import IGNORE


def _shard(n: int, rank: int, world: int) -> list:
    per_rank = math.ceil(n / world)
    mine = list(range(rank, n, world))
    return mine + [-1] * (per_rank - len(mine))  # -1: padding row, contributes nothing


@torch.no_grad()
def _loss_and_accuracy(model, dataset, indices: list, micro: int, pad_id: int, device) -> torch.Tensor:
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, target tokens, correct tokens
    for i in range(0, len(indices), micro):
        chunk = indices[i : i + micro]
        rows = dataset[[max(j, 0) for j in chunk]]
        labels = [lab if j >= 0 else [IGNORE] * len(lab) for j, lab in zip(chunk, rows["labels"])]
        batch = {k: v.to(device) for k, v in pad_collate(rows["input_ids"], labels, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        mask = target != IGNORE
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
        sums += torch.tensor([loss.item(), mask.sum().item(), ((logits.argmax(-1) == target) & mask).sum().item()], dtype=torch.float64)
    return sums


@torch.no_grad()
def _exact_match(module, dataset, indices: list, tokenizer, device) -> torch.Tensor:
    """Greedy-decode the final reply; a hit needs every token, end-of-turn token included."""
    hits = torch.zeros(2, dtype=torch.float64)
    stop = module.generation_config.eos_token_id
    stop = [stop] if isinstance(stop, int) else list(stop or [])
    for j in indices:
        row = dataset[max(j, 0)]
        prompt = torch.tensor([row["input_ids"][: row["reply_start"]]], device=device)
        reference = row["input_ids"][row["reply_start"] : row["reply_end"]]
        config = GenerationConfig(max_new_tokens=len(reference), do_sample=False, eos_token_id=stop or None, pad_token_id=tokenizer.pad_token_id)
        out = module.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config, use_cache=True)
        if j >= 0:
            hits += torch.tensor([float(out[0, prompt.size(1) :].tolist() == reference), 1.0], dtype=torch.float64)
    return hits


def evaluate(engine, dist, dataset, micro: int, tokenizer, generate: int) -> dict:
    model = engine.model
    model.eval()
    sums = _loss_and_accuracy(model, dataset, _shard(len(dataset), dist.rank, dist.world_size), micro, tokenizer.pad_token_id, dist.device)
    loss_sum, n, correct = dist.all_reduce_sum(sums).tolist()
    result = {"eval_loss": loss_sum / n, "eval_perplexity": math.exp(min(loss_sum / n, 50.0)), "eval_token_accuracy": correct / n}
    if generate > 0:
        usable = [i for i, end in enumerate(dataset["reply_end"]) if end > 0][:generate]
        shard = [usable[i] if i >= 0 else -1 for i in _shard(len(usable), dist.rank, dist.world_size)]
        hits, total = dist.all_reduce_sum(_exact_match(engine.unwrapped(), dataset, shard, tokenizer, dist.device)).tolist()
        result["eval_exact_match"] = hits / max(total, 1.0)
    model.train()
    return result
