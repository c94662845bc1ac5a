"""The training loop: accumulate, normalise, clip, step, evaluate, log.

Loss normalisation: an optimizer step's loss is the sum of the token losses of all its
micro-batches on all ranks, divided by the number of target tokens in all of them.
Each micro-batch contributes `sum(token losses) / N_step`, where N_step is all-reduced
before the first forward, so the gradient does not depend on how the step's examples
are split into micro-batches or across ranks (tests/test_loss_normalisation.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from launcher.data.batches import BatchPlan, collate
from launcher.data.packing import PACKED_KEYS
from launcher.data.tokenize import IGNORE
from launcher.evaluate import evaluate
from launcher.flops import MFU
from launcher.logs import Console, MetricsLog
from launcher.loss import applies as loss_chunks_apply
from launcher.loss import chunked_token_loss_sum


@dataclass(frozen=True)
class Schedule:
    batches: BatchPlan
    total_steps: int
    warmup_steps: int


def make_schedule(train_cfg, seed: int, shuffle: bool, num_examples: int, world_size: int, lengths=None, pack_tokens: int = 0) -> Schedule:
    """Batch arithmetic shared by `sft plan` and the workers. Raises ValueError with a user message.
    `lengths` (tokens per example) groups micro-batches by length, or packs them (`pack_tokens` > 0)."""
    micro = train_cfg.micro_batch_size
    if train_cfg.global_batch_size is not None:
        per_step = micro * world_size
        if train_cfg.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={train_cfg.global_batch_size} is not a multiple of micro_batch_size x world size "
                f"= {micro} x {world_size} = {per_step}. Choose a global batch that is, or change the micro batch."
            )
        accumulation = train_cfg.global_batch_size // per_step
    else:
        accumulation = train_cfg.gradient_accumulation_steps or 1
    if pack_tokens and lengths and max(lengths) > pack_tokens:
        raise ValueError(
            f"data.pack_tokens={pack_tokens} is smaller than the longest training example ({max(lengths)} tokens), which "
            "would fit no packed micro-batch. Raise data.pack_tokens (unset, it is micro_batch_size x max_seq_len)."
        )
    batches = BatchPlan(num_examples, micro, accumulation, world_size, seed, shuffle, lengths, pack_tokens)
    if batches.steps_per_epoch == 0:
        raise ValueError(
            f"{num_examples} training examples do not fill one global batch of {batches.global_batch} "
            f"(micro {micro} x accumulation {accumulation} x {world_size} ranks). Use more data or a smaller batch."
        )
    total = train_cfg.max_steps if train_cfg.max_steps > 0 else math.ceil(train_cfg.epochs * batches.steps_per_epoch)
    warmup = train_cfg.warmup_steps or math.ceil(train_cfg.warmup_ratio * total)
    return Schedule(batches=batches, total_steps=total, warmup_steps=min(warmup, total))


def model_inputs(batch: dict) -> dict:
    """What the model is called with: a padded batch's mask, or a packed row's positions and boundaries
    (never both: a mask would switch transformers' packed-row handling off)."""
    if "attention_mask" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {k: batch[k] for k in PACKED_KEYS}


def token_loss_sum(model: torch.nn.Module, batch: dict, chunk_tokens: int = 0) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the target tokens of a batch;
    `chunk_tokens` > 0: computed chunk by chunk from the hidden states (launcher/loss.py)."""
    if chunk_tokens > 0:
        return chunked_token_loss_sum(model, model_inputs(batch), batch["labels"], chunk_tokens)
    logits = model(**model_inputs(batch)).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def class_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sequence classification: the sum of each row's cross-entropy times its class weight; divided by
    the step's summed weights this is torch's weighted-mean cross-entropy over the global batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    per_row = F.cross_entropy(logits, batch["class_ids"].clamp(min=0), reduction="none")
    return (per_row * batch["example_weights"]).sum()


def loss_sum(model: torch.nn.Module, batch: dict, chunk_tokens: int = 0) -> torch.Tensor:
    return class_loss_sum(model, batch) if "class_ids" in batch else token_loss_sum(model, batch, chunk_tokens)


def target_count(batch: dict) -> float:
    """What a batch's loss sum is normalised by: target tokens, or the summed class weights of its rows."""
    if "class_ids" in batch:
        return float(batch["example_weights"].sum())
    return float((batch["labels"][:, 1:] != IGNORE).sum())


def step_batches(dataset, schedule: Schedule, step: int, rank: int, pad_id: int, device, class_weights=None) -> list:
    out, packed = [], schedule.batches.pack_tokens > 0
    for indices in schedule.batches.micro_batches(step, rank):
        batch = collate(dataset[indices], pad_id, class_weights, packed=packed)
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return out


def accumulate_gradients(engine, batches: list, dist, chunk_tokens: int = 0) -> dict:
    """Forward and backward over this rank's micro-batches of one step, normalised for the whole step."""
    local_targets = sum(target_count(b) for b in batches)
    local_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    n_targets, n_tokens = dist.all_reduce_sum(torch.tensor([float(local_targets), float(local_tokens)])).tolist()
    summed = torch.zeros((), dtype=torch.float64)
    for j, batch in enumerate(batches):
        with engine.accumulating(is_last_micro_batch=j == len(batches) - 1):
            s = loss_sum(engine.model, batch, chunk_tokens)
            engine.backward(s * (engine.grad_scale / n_targets))
        summed += s.detach().double().cpu()
    loss = float(dist.all_reduce_sum(summed)) / n_targets
    return {"loss": loss, "target_tokens": int(n_targets), "tokens": int(n_tokens)}


def train_step(engine, batches: list, dist, max_grad_norm: float, chunk_tokens: int = 0) -> dict:
    stats = accumulate_gradients(engine, batches, dist, chunk_tokens)
    stats["grad_norm"] = engine.clip_and_step(max_grad_norm)
    return stats


def _stopped_by(stop) -> str:
    return (stop.signal_name if stop is not None else None) or "a signal on another rank"


def _boundary(dist, stop, timed_save_due: bool) -> tuple:
    """Collective, once per step: stop now (a signal reached any rank)? A timed save due (rank 0's clock)?"""
    flags = dist.all_reduce_sum(torch.tensor([float(stop is not None and stop.requested), float(timed_save_due)]))
    return bool(flags[0]), bool(flags[1])


def train(recipe, engine, dist, prepared, schedule: Schedule, tokenizer, run_dir, save_checkpoint, stop=None, resumed=None, metrics=None) -> dict:
    """`save_checkpoint(step, scheduler, stopped_by)` is collective; it runs every checkpoint.every_steps
    steps, every checkpoint.every_minutes, after the last step, and when a stop signal arrives (then
    Preempted is raised on every rank). `resumed`: the checkpoint to continue from (its engine state
    is already loaded). `metrics`: a MetricsLog (with the run's trackers); default metrics.jsonl alone."""
    from launcher.checkpoint import read_state, restore_rng
    from launcher.preemption import Preempted

    t, ck = recipe.train, recipe.checkpoint
    scheduler = get_scheduler(t.lr_scheduler, engine.optimizer, num_warmup_steps=schedule.warmup_steps, num_training_steps=schedule.total_steps)
    start_step = 0
    if resumed is not None:
        state = read_state(resumed)
        start_step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        # Creating the scheduler reset the optimizer's LR to step 0's; put back the resumed step's.
        for group, lr, base in zip(engine.optimizer.param_groups, scheduler.get_last_lr(), scheduler.base_lrs):
            group["lr"], group["initial_lr"] = lr, base
    metrics = metrics or MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main)
    console = Console(schedule.total_steps, enabled=dist.is_main)
    pad_id = tokenizer.pad_token_id
    mfu = MFU(engine.unwrapped(), dist.device)

    classes = prepared.classes
    class_weights = classes.weights if classes is not None else None
    chunk_tokens = t.loss_chunk_tokens if loss_chunks_apply(engine.unwrapped()) else 0

    def run_eval(step: int) -> dict:
        if prepared.eval is None:
            return {}
        result = evaluate(engine, dist, prepared.eval, t.micro_batch_size, tokenizer, t.eval_generate, classes, t.eval_generate_batch_size)
        metrics.write({"step": step, **result})
        console.eval(step, result)
        return result

    first_eval = run_eval(0) if t.eval_at_start and start_step == 0 else {}
    engine.model.train()
    if resumed is not None:
        # Last, so nothing between here and the first step draws from the RNG (dropout must continue exactly).
        restore_rng(resumed, dist.rank)
    if _boundary(dist, stop, False)[0]:  # stopped while loading: nothing new to save
        raise Preempted(start_step, _stopped_by(stop))
    start = last_save = time.perf_counter()
    last = {}
    for step in range(start_step, schedule.total_steps):
        batches = step_batches(prepared.train, schedule, step, dist.rank, pad_id, dist.device, class_weights)
        tick = time.perf_counter()
        last = train_step(engine, batches, dist, t.max_grad_norm, chunk_tokens)
        lr = scheduler.get_last_lr()[0]
        skipped = not engine.step_applied()
        if not skipped:  # a step DeepSpeed skipped (fp16 overflow) does not advance the schedule, as in HF Trainer
            scheduler.step()
        done = step + 1
        if done % recipe.logging.every_steps == 0 or done == schedule.total_steps:
            elapsed = time.perf_counter() - start
            seconds = time.perf_counter() - tick
            row = {
                "step": done,
                "epoch": round(done / schedule.batches.steps_per_epoch, 4),  # at the end of the step, as HF logs it
                "loss": last["loss"],
                "lr": lr,
                "grad_norm": last["grad_norm"],
                "tokens_per_s": last["tokens"] / max(seconds, 1e-9),
                "elapsed_s": round(elapsed, 3),
            }
            if done - scheduler.last_epoch:  # skipped steps so far: their data is used up, not replayed
                row["skipped_steps"] = done - scheduler.last_epoch
            if skipped:
                row["skipped"] = True
            utilisation = mfu(last["tokens"], schedule.batches.global_batch, seconds, dist.world_size)
            if utilisation is not None:
                row["mfu"] = round(utilisation, 4)
            if dist.device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dist.device) / 2**30, 3)
                torch.cuda.reset_peak_memory_stats(dist.device)
            metrics.write(row)
            console.step(done, row, eta_s=(elapsed / (done - start_step)) * (schedule.total_steps - done))
        if t.eval_every and done % t.eval_every == 0 and done != schedule.total_steps:
            run_eval(done)
        timed = dist.is_main and ck.every_minutes > 0 and time.perf_counter() - last_save >= 60 * ck.every_minutes
        stopping, timed = _boundary(dist, stop, timed)
        if stopping or timed or (ck.every_steps and done % ck.every_steps == 0) or done == schedule.total_steps:
            stopped_by = _stopped_by(stop) if stopping else None
            tick = time.perf_counter()
            save_checkpoint(done, scheduler, stopped_by)
            last_save = time.perf_counter()
            metrics.write({"step": done, "checkpoint_save_s": round(last_save - tick, 3)})
        if stopping:
            raise Preempted(done, stopped_by)
    final_eval = run_eval(schedule.total_steps)
    console.close()
    return {"first_eval": first_eval, "final_eval": final_eval, "final_loss": last.get("loss"), "start_step": start_step}
