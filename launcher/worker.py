"""One training process per rank: data -> model -> engine -> loop -> export.

Started by `sft run` through torch's elastic agent, or directly by users who launch
themselves: `torchrun --nproc_per_node 8 -m launcher.worker RECIPE [key=value ...]`.
Rank and world come from the environment torchrun sets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from launcher import checkpoint

# Set by `sft run`: the launcher has already checked the run dir and saved the recipe.
LAUNCHED_ENV = "SFT_LAUNCHED"


def _quiet_libraries() -> None:
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot parse is our DataError, not its log line
    import warnings

    # DeepSpeed calls torch collectives that torch has renamed; the warning repeats on every call
    # (hundreds of lines per step under ZeRO-3) and there is nothing a user can do about it.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def run(recipe, dist, stop=None) -> dict:
    from transformers import set_seed

    from launcher import engines, resume, rundir
    from launcher.cache import cache_root
    import numpy as np

    from launcher.data import packing as packed
    from launcher.data.stats import padding_waste
    from launcher.data.classify import sequence_labels
    from launcher.data.prepare import data_files, prepare
    from launcher.logs import MetricsLog
    from launcher.model import add_lora, enable_gradient_checkpointing, load_model, load_tokenizer, model_dir, resolve_dtype
    from launcher.train import make_schedule, train

    set_seed(recipe.seed)
    run_dir = Path(recipe.output_dir)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if dist.is_main and os.environ.get(LAUNCHED_ENV) != "1" and not restarted:
        rundir.check_output_dir(recipe, overwrite=False)
        rundir.save_recipe(recipe)
    dist.barrier()

    cache = cache_root(recipe.data.cache_dir)
    with dist.local_main_first():  # one process per node tokenizes; the rest read its cache
        path = model_dir(recipe.model, cache)
        tokenizer = load_tokenizer(path, recipe.model)
        prepared = prepare(recipe.data, tokenizer, cache, recipe.seed, recipe.task)
    lengths = packed.example_lengths(prepared.train)
    schedule = make_schedule(recipe.train, recipe.seed, recipe.data.shuffle, len(prepared.train), dist.world_size, lengths)
    packing = packed.enabled(recipe, padding_waste(schedule.batches, np.asarray(lengths)))
    if packing:
        schedule = make_schedule(recipe.train, recipe.seed, recipe.data.shuffle, len(prepared.train), dist.world_size,
                                 lengths, packed.budget(recipe))
    resumed = resume.start_checkpoint(recipe)
    start_step, init_from = 0, None
    continuing = resumed is not None and resume.continues(recipe, resumed)
    if resumed is not None:
        resume.check(recipe, resumed, path, schedule.batches.global_batch, schedule.total_steps, dist.world_size, prepared.classes,
                     data_files(prepared.stats))
        state = checkpoint.read_state(resumed)
        if continuing:
            start_step, init_from = state["step"], state.get("init_from")
        else:  # another run's checkpoint: step 0 of this run from its weights and moments (resume.py)
            init_from = {"checkpoint": str(resumed.resolve()), "step": state["step"]}
    if dist.is_main:
        resume.trim_metrics(run_dir, start_step)  # the steps after the checkpoint are logged again

    accumulation = schedule.batches.accumulation
    st = recipe.strategy
    deepspeed = st.backend == "deepspeed"
    with engines.model_init(recipe, dist, accumulation):
        # fsdp and ddp keep fp32 master weights and compute in bf16 themselves; DeepSpeed loads bf16 (engines.load_dtype).
        fsdp = st.backend == "fsdp"
        dtype = engines.load_dtype(recipe, dist.device)
        # FSDP: only rank 0 reads the weights; it scatters them into the shards after wrapping.
        classes = prepared.classes
        hf_model = load_model(path, recipe.model, dtype, dist.device, weights=not fsdp or dist.rank == 0,
                              sequence_labels=sequence_labels(classes), pad_token_id=tokenizer.pad_token_id, packing=packing)
        if recipe.model.gradient_checkpointing:
            # peft + ZeRO-3 + non-reentrant checkpointing raises CheckpointError (DESIGN.md, known traps).
            enable_gradient_checkpointing(hf_model, reentrant=recipe.lora.enabled and deepspeed and st.zero_stage == 3)
        if recipe.lora.enabled:
            # Loading draws from the RNG differently per engine (ZeRO-3 initialises a new classification
            # head under its own partitioning): reseed so the adapters start the same on every engine.
            set_seed(recipe.seed)
        model = add_lora(hf_model, recipe.lora, adapter_dtype_follows_base=deepspeed) if recipe.lora.enabled else hf_model
    engine = engines.build(recipe, model, dist, accumulation)
    from launcher.trackers import Trackers

    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main, trackers=Trackers(recipe, run_dir, start_step) if dist.is_main else None)
    if resumed is not None:
        tick = time.perf_counter()
        settings = resume.optimizer_settings(engine.optimizer)
        engine.load_checkpoint(resumed / "model")
        if not continuing:
            resume.keep_settings(engine.optimizer, settings)
        dist.barrier()
        seconds = time.perf_counter() - tick
        if dist.is_main:
            row = {"step": start_step, "checkpoint_load_s": round(seconds, 3)}
            metrics.write(row if continuing else {**row, "init_from": init_from})
            what = (f"resumed from {resumed} (step {start_step} of {schedule.total_steps})" if continuing
                    else f"started from {resumed} (its step {init_from['step']}; this run starts at step 0)")
            print(f"{what} in {seconds:.1f} s", file=sys.stderr, flush=True)

    verify_rows = prepared.eval if prepared.eval is not None else prepared.train
    verify_ids = [list(ids[:256]) for ids in verify_rows.select(range(min(len(verify_rows), recipe.export.verify_prompts)))["input_ids"]]
    meta = {
        "total_steps": schedule.total_steps,
        "global_batch": schedule.batches.global_batch,
        "backend": st.backend,
        "zero_stage": st.zero_stage if deepspeed else None,
        "lora": recipe.lora.enabled,
        "train_dtype": str(resolve_dtype(recipe.model.dtype, dist.device)).removeprefix("torch."),
        "base_model": str(Path(path).resolve()),
        "sequence_labels": sequence_labels(classes),  # a sequence classifier: export builds one with these classes
        "data_files": data_files(prepared.stats),  # content digests: a resume refuses edited data
        "init_from": init_from,  # another run's checkpoint this run started from (its weights and optimizer moments)
    }

    def write_extras(directory: Path) -> None:
        shutil.copyfile(run_dir / "recipe.yaml", directory / "recipe.yaml")
        hf_model.config.save_pretrained(directory / "hf")
        if getattr(hf_model, "generation_config", None) is not None:  # a sequence classifier has none
            hf_model.generation_config.save_pretrained(directory / "hf")
        tokenizer.save_pretrained(directory / "hf")
        (directory / "verify_prompts.json").write_text(json.dumps(verify_ids))
        if classes is not None:
            from launcher.data.classify import describe

            (directory / "classification.json").write_text(json.dumps(describe(classes, recipe.task, tokenizer), indent=1))

    def save_checkpoint(step: int, scheduler, stopped_by) -> None:
        from launcher import verify

        # What export checks against: every rank runs these forwards (a collective under ZeRO-3 and FSDP).
        live = verify.live_logits(engine.model, verify_ids, dist.device)

        def extras(directory: Path) -> None:
            write_extras(directory)
            verify.write(directory, live, path if recipe.lora.enabled else None)

        state = {**meta, "epoch": step / schedule.batches.steps_per_epoch, "scheduler": scheduler.state_dict(), "stopped_by": stopped_by}
        checkpoint.save(engine, run_dir, step, dist, recipe.checkpoint.keep_last, state, extras)

    finished = False
    try:
        result = train(recipe, engine, dist, prepared, schedule, tokenizer, run_dir, save_checkpoint, stop, resumed if continuing else None, metrics)
        finished = True
        return result
    finally:
        metrics.close(finished)  # a stopped run's tracker run is marked so, and continues on resume


def export_final(recipe) -> Path:
    """After training, on rank 0 alone: the latest checkpoint becomes output_dir/final."""
    from launcher.export import export

    run_dir = Path(recipe.output_dir)
    out = run_dir / "final"
    export(checkpoint.resolve(run_dir), out, replace_earlier_export=True)
    return out


def _summary(result: dict, run_dir: Path, exported: bool) -> None:
    loss = result["final_loss"]
    lines = [f"done: final train loss {loss:.4f}" if loss is not None else f"done: all {result['start_step']} steps were trained before"]
    first, final = result["first_eval"], result["final_eval"]
    for key in ("eval_loss", "eval_token_accuracy", "eval_exact_match", "eval_accuracy", "eval_macro_f1"):
        if key in final:
            before = f"{first[key]:.4f} -> " if key in first else ""
            lines.append(f"  {key}: {before}{final[key]:.4f}")
    if "eval_per_class" in final:
        from launcher.evaluate import classification_table

        lines.append(classification_table(final))
    if exported:
        lines.append(f"  model: {run_dir / 'final'}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launcher.worker", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)

    from launcher import dist as dist_mod
    from launcher import heartbeat, preemption
    from launcher.errors import UserError
    from launcher.recipe import load_recipe

    _quiet_libraries()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        watched = os.environ.get(LAUNCHED_ENV) == "1" and "RANK" in os.environ
        if watched:
            heartbeat.start(Path(recipe.output_dir) / "logs", int(os.environ["RANK"]))  # watched by `sft run`
        stop = preemption.install(recipe.checkpoint.signal_grace_s)
        dist = dist_mod.init(recipe.launch.collective_timeout_s)
        finished = False
        try:
            result = run(recipe, dist, stop)
            finished = True
        except preemption.Preempted as e:
            dist_mod.shutdown(synchronise=True)  # every rank agreed to stop and saved
            if dist.is_main:
                saved = checkpoint.latest(Path(recipe.output_dir))
                where = f"checkpoint {saved} is complete" if saved else "no checkpoint yet, so a rerun starts at step 0"
                print(f"stopped by {e.signal_name} at step {e.step}; {where}. Run the same command again to resume "
                      f"(exit code {preemption.EXIT_RESUMABLE}).", file=sys.stderr, flush=True)
            return preemption.EXIT_RESUMABLE
        finally:
            dist_mod.shutdown(synchronise=finished)  # after a stop, the group is already gone
            if watched:
                heartbeat.stop(Path(recipe.output_dir) / "logs", int(os.environ["RANK"]))
        if dist.is_main:
            # Export runs after the group is gone: a long export must not hit a peer's collective timeout.
            import gc

            gc.collect()  # the engine's shards and optimizer state are unreachable by now
            from launcher.plot import curves_after_run

            curves_after_run(Path(recipe.output_dir))
            if recipe.export.on_finish:
                export_final(recipe)
            _summary(result, Path(recipe.output_dir), recipe.export.on_finish)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    from launcher.dist import exit_process

    exit_process(record(main)())  # record: a crash's traceback goes to TORCHELASTIC_ERROR_FILE for `sft run`'s report
