"""Evaluation: loss, perplexity and token accuracy on the eval set, and exact match by generation;
for classification, loss, accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

Every rank evaluates an equal-length shard (short shards are padded with a row whose
labels are all ignored), so all ranks run the same number of forward passes: sharded
engines need that. Sums are all-reduced, so the numbers do not depend on world size.
Exact match decodes in batches, in lockstep across ranks (launcher/generation.py); an lm-head
classifier scores all labels on one shared forward over each prompt.
"""

from __future__ import annotations

import inspect
import math
import time

import torch

from launcher import generation
from launcher.data.batches import collate, pad_collate
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
def _exact_match(module, dataset, indices: list, filler: int, tokenizer, device, batch_size: int, synced: bool) -> torch.Tensor:
    """Greedy-decode the final reply of each row in batches; a hit needs every token, end-of-turn token
    included. A padding index (-1) decodes usable row `filler` and counts nothing: every rank must
    join every batch (and row 0 may be a row whose reply was cut, with no prompt to decode)."""
    hits = torch.zeros(2, dtype=torch.float64)
    if not indices:
        return hits
    stop = generation.stop_ids(module)
    rows = dataset[[j if j >= 0 else filler for j in indices]]
    items = [(j, ids[:start], ids[start:end]) for j, ids, start, end in zip(indices, rows["input_ids"], rows["reply_start"], rows["reply_end"])]
    # Longest references first: a batch decodes until its longest reply, so similar lengths go together.
    items.sort(key=lambda item: -len(item[2]))
    for chunk in generation.batched(items, batch_size):
        limit = max(len(ref) for _, _, ref in chunk)
        replies = generation.generate(module, [p for _, p, _ in chunk], limit, tokenizer.pad_token_id, stop, device, synced)
        for (j, _, reference), reply in zip(chunk, replies):
            if j >= 0:
                hits += torch.tensor([float(reply[: len(reference)] == reference), 1.0], dtype=torch.float64)
    return hits


@torch.no_grad()
def _sequence_predictions(model, dataset, indices: list, micro: int, pad_id: int, device, classes) -> tuple:
    """(predicted class, true class) per real row, and [weighted loss sum, summed weights]."""
    pairs, sums = [], torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(indices), micro):
        chunk = indices[i : i + micro]
        rows = dataset[[max(j, 0) for j in chunk]]
        true = [c if j >= 0 else IGNORE for j, c in zip(chunk, rows["class_id"])]  # a padding row has no class
        batch = {k: v.to(device) for k, v in collate({"input_ids": rows["input_ids"], "class_id": true}, pad_id, classes.weights).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        per_row = torch.nn.functional.cross_entropy(logits, batch["class_ids"].clamp(min=0), reduction="none")
        sums += torch.tensor([float((per_row * batch["example_weights"]).sum()), float(batch["example_weights"].sum())], dtype=torch.float64)
        pairs += [(p, c) for p, c in zip(logits.argmax(-1).tolist(), true) if c != IGNORE]
    return pairs, sums


def _cache_keyword() -> str:
    """transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_KW = _cache_keyword()


@torch.no_grad()
def _label_scores(model, prompts: list, completions: list, pad_id: int, device) -> torch.Tensor:
    """Sum of log-probabilities of every label's tokens after each prompt, [prompts, labels]. The labels
    share their prompt: one forward over the (left-padded) prompts, then one over all labels' tokens
    on the prompts' KV cache, so L labels cost two forwards per batch instead of L."""
    L = len(completions)
    ids, mask = generation.left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as if each prompt were alone (right-padded, as training sees it)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # every prompt ends at the last column
    scores = first[:, [c[0] for c in completions]].double()
    rest = [c[1:] for c in completions]  # the tokens each label's own earlier tokens predict
    width = max(len(c) - 1 for c in completions)
    if width == 0:
        return scores.cpu()
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(L)  # rows: prompt 0 with labels 0..L-1, prompt 1, ...
    feed = torch.tensor([list(c[:-1]) + [pad_id] * (width - len(c) + 1) for c in completions], device=device).repeat(len(prompts), 1)
    feed_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (width - len(c) + 1) for c in completions], device=device).repeat(len(prompts), 1)
    full_mask = torch.cat([mask.repeat_interleave(L, 0), feed_mask], 1)
    feed_pos = positions[:, -1:].repeat_interleave(L, 0) + 1 + torch.arange(width, device=device)
    logits = model(input_ids=feed, attention_mask=full_mask, position_ids=feed_pos, use_cache=True, **{_CACHE_KW: cache}).logits
    logp = torch.log_softmax(logits.float(), -1)
    target = torch.tensor([list(r) + [0] * (width - len(r)) for r in rest], device=device).repeat(len(prompts), 1)
    per_token = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * feed_mask
    return (scores + per_token.sum(-1).double().view(len(prompts), L)).cpu()


def _lm_predictions(model, dataset, indices: list, micro: int, pad_id: int, device, classes) -> tuple:
    """Score every label's tokens after each row's prompt (sum of log-probabilities); the best is the
    prediction. Returns (predicted, true) pairs and [-log p(true label) summed, true label tokens]."""
    pairs, sums = [], torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(indices), micro):  # equal batches on every rank (indices are padded)
        chunk = indices[i : i + micro]
        rows = dataset[[max(j, 0) for j in chunk]]
        prompts = [ids[:start] for ids, start in zip(rows["input_ids"], rows["reply_start"])]
        scores = _label_scores(model, prompts, classes.completions, pad_id, device)
        for j, true, row_scores in zip(chunk, rows["class_id"], scores):
            if j >= 0:
                pairs.append((int(row_scores.argmax()), true))
                sums += torch.tensor([-float(row_scores[true]), len(classes.completions[true])], dtype=torch.float64)
    return pairs, sums


def classification_metrics(confusion: torch.Tensor, names: list) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix (rows: true
    class, columns: predicted). Macro-F1 averages the classes that occur in the labels or predictions."""
    confusion = confusion.double()
    hits, support, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, hits / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    present = (support > 0) | (predicted > 0)
    per_class = {
        name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]), "support": int(support[c])}
        for c, name in enumerate(names)
    }
    return {
        "eval_accuracy": float(hits.sum() / confusion.sum().clamp(min=1)),
        "eval_macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "eval_per_class": per_class,
        "eval_confusion_matrix": {"labels": list(names), "rows_true_columns_predicted": confusion.long().tolist()},
    }


def classification_table(result: dict) -> str:
    """Per-class precision/recall/F1/support and the confusion matrix, as text for people."""
    per_class, matrix = result["eval_per_class"], result["eval_confusion_matrix"]
    width = max(8, *(len(n) for n in per_class))
    lines = [f"  {'class':<{width}}  precision  recall     f1  support"]
    for name, m in per_class.items():
        lines.append(f"  {name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines.append("  confusion matrix (rows: true class, columns: predicted, in the order above)")
    for name, row in zip(matrix["labels"], matrix["rows_true_columns_predicted"]):
        lines.append(f"  {name:<{width}}  " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)


def _evaluate_classes(engine, dist, dataset, micro: int, pad_id: int, classes) -> dict:
    shard = _shard(len(dataset), dist.rank, dist.world_size)
    predict = _lm_predictions if classes.head == "lm" else _sequence_predictions
    pairs, sums = predict(engine.model, dataset, shard, micro, pad_id, dist.device, classes)
    C = len(classes.names)
    confusion = torch.zeros(C, C, dtype=torch.float64)
    for pred, true in pairs:
        confusion[true, pred] += 1
    total = dist.all_reduce_sum(torch.cat([confusion.flatten(), sums]))
    loss_sum, n = total[-2:].tolist()
    return {"eval_loss": loss_sum / max(n, 1e-12), **classification_metrics(total[:-2].reshape(C, C), classes.names)}


def evaluate(engine, dist, dataset, micro: int, tokenizer, generate: int, classes=None, generate_batch: int = 0) -> dict:
    """Eval metrics, the same on every rank. `generate`: rows to decode for exact match, in batches
    of `generate_batch` (0: the micro batch), in lockstep across ranks."""
    model = engine.model
    model.eval()
    if classes is not None:
        result = _evaluate_classes(engine, dist, dataset, micro, tokenizer.pad_token_id, classes)
        model.train()
        return result
    sums = _loss_and_accuracy(model, dataset, _shard(len(dataset), dist.rank, dist.world_size), micro, tokenizer.pad_token_id, dist.device)
    loss_sum, n, correct = dist.all_reduce_sum(sums).tolist()
    result = {"eval_loss": loss_sum / n, "eval_perplexity": math.exp(min(loss_sum / n, 50.0)), "eval_token_accuracy": correct / n}
    if generate > 0:
        usable = [i for i, end in enumerate(dataset["reply_end"]) if end > 0][:generate]
        shard = [usable[i] if i >= 0 else -1 for i in _shard(len(usable), dist.rank, dist.world_size)]
        filler = usable[0] if usable else 0
        tick = time.perf_counter()
        em = _exact_match(engine.unwrapped(), dataset, shard, filler, tokenizer, dist.device, generate_batch or micro, generation.lockstep(dist))
        hits, total = dist.all_reduce_sum(em).tolist()
        result["eval_exact_match"] = hits / max(total, 1.0)
        result["eval_generate_s"] = round(time.perf_counter() - tick, 3)  # the slowest rank's time: they end together
    model.train()
    return result
