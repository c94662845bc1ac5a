"""The `sft` command: plan, run, submit (Slurm), export, generate, chat and plot."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USAGE = """sft plan RECIPE [key=value ...]       validate the recipe, data and model; print the plan
sft run  RECIPE [key=value ...]       train on this machine (--nproc N ranks; multi-node:
                                      --nnodes N --node-rank R --rdzv-endpoint HOST:PORT)
sft submit RECIPE [key=value ...] [--dry-run]
                                      queue it on Slurm (slurm.nodes x launch.nproc_per_node ranks)
sft export RUN_DIR_OR_CHECKPOINT --out DIR [--adapter-only] [export.key=value ...]
                                      write a deployable Hugging Face model, verified
sft generate MODEL_OR_RUN --prompts FILE --out FILE [--batch-size N --max-new-tokens N --temperature T --top-p P]
                                      batched replies with the model's chat template (greedy by default)
sft chat MODEL_OR_RUN [--system TEXT --max-new-tokens N --temperature T --top-p P]
                                      talk to the model in the terminal
sft plot RUN_DIR [--out FILE.png]     draw the run's training curves (default RUN_DIR/curves.png)"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft", description="Fine-tune causal LLMs from one YAML recipe.", usage=USAGE)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("plan", "run"):
        s = sub.add_parser(name, prog=f"sft {name}")  # its own usage line, not the whole USAGE
        s.add_argument("recipe", help="path of the YAML recipe")
        s.add_argument("overrides", nargs="*", help="recipe overrides as key=value (OmegaConf dotlist)")
        s.add_argument("--nproc", type=int, help="ranks on this machine (same as launch.nproc_per_node=N)")
        s.add_argument("--nnodes", type=int, help="nodes in a multi-node run (launch.nnodes)")
        s.add_argument("--node-rank", type=int, help="this node's rank, 0 to nnodes-1 (launch.node_rank)")
        s.add_argument("--rdzv-endpoint", help="HOST:PORT of node 0, the same on every node (launch.rdzv_endpoint)")
        if name == "run":
            s.add_argument("--overwrite", action="store_true", help="delete an earlier run's files in output_dir and start over")
    sb = sub.add_parser("submit", prog="sft submit")
    sb.add_argument("recipe", help="path of the YAML recipe")
    sb.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. slurm.nodes=4")
    sb.add_argument("--nproc", type=int, help="ranks per node (same as launch.nproc_per_node=N)")
    sb.add_argument("--dry-run", action="store_true", help="write the sbatch script into output_dir and print it; queue nothing")
    e = sub.add_parser("export", prog="sft export")
    e.add_argument("source", help="a run's output_dir (its latest checkpoint) or a checkpoints/step-NNNNNN directory")
    e.add_argument("overrides", nargs="*", help="overrides of the run's recipe, e.g. export.dtype=bfloat16 or model.path=BASE_DIR")
    e.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    e.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter (PEFT format) instead of a merged model")
    for name in ("generate", "chat"):
        g = sub.add_parser(name)
        g.add_argument("model", help="an exported model directory, or a run's output_dir (its final/)")
        if name == "generate":
            g.add_argument("--prompts", required=True, help='JSONL: {"messages": [...]} or {"prompt": "..."} per line')
            g.add_argument("--out", required=True, help="JSONL to write: each input row with its \"reply\"")
            g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
            g.add_argument("--seed", type=int, default=0, help="the sampling seed (with --temperature > 0)")
        else:
            g.add_argument("--system", help="a system message that starts the conversation")
        g.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens (default 256)")
        g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
        g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0 (default 1.0: off)")
    pl = sub.add_parser("plot")
    pl.add_argument("run_dir", help="a run's output_dir (it reads metrics.jsonl; a killed run's partial file is fine)")
    pl.add_argument("--out", help="the PNG to write (default RUN_DIR/curves.png)")
    return p


def _generate(args) -> int:
    from launcher.generate import generate_file

    report = generate_file(Path(args.model), Path(args.prompts), Path(args.out), args.batch_size, args.max_new_tokens,
                           args.temperature, args.top_p, args.seed)
    print(f"wrote {report['rows']} replies from {report['model']} ({report['device']}) to {args.out}", flush=True)
    return 0


def _export(args, overrides) -> int:
    import signal

    from launcher.export import export

    # SIGTERM unwinds like an error, so the export's temporary copy is removed and --out stays as it was.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = export(Path(args.source), Path(args.out), adapter_only=args.adapter_only, overrides=overrides)
    kind = "adapter" if report["adapter_only"] else ("merged model" if report["merged"] else "model")
    print(
        f"exported {kind} ({report['parameters']:,} parameters, {report['dtype']}) from {report['source_checkpoint']} to {args.out}; "
        f"max |logit difference| to the trained model {report['max_abs_logit_diff']:.2e} (tolerance {report['tolerance']:.2e})",
        flush=True,
    )
    return 0


def _submit(args, overrides) -> int:
    from launcher import hub, rundir
    from launcher.launch import slurm
    from launcher.plan import format_plan, make_plan
    from launcher.recipe import load_recipe

    nodes = load_recipe(args.recipe, overrides).slurm.nodes
    recipe = load_recipe(args.recipe, overrides + [f"launch.nnodes={nodes}"])  # the plan counts every node's ranks
    slurm.check(recipe)
    text = format_plan(make_plan(recipe, here=False), recipe)  # the job's nodes have the GPUs, not this one
    print(text, flush=True)
    rundir.check_output_dir(recipe, overwrite=False)
    rendered = slurm.render(recipe, args.recipe, overrides, Path.cwd())
    run_dir = Path(recipe.output_dir)
    rundir.save_recipe(recipe)
    hub.record(run_dir)  # the job (compute nodes may be offline) reads these commits from the cache
    (run_dir / "plan.txt").write_text(text + "\n")
    script = run_dir / "submit.sbatch"
    script.write_text(rendered)
    if args.dry_run:
        print(f"wrote {script} (not submitted: --dry-run)", flush=True)
        return 0
    job = slurm.submit(script)
    print(f"submitted job {job}: {nodes} node(s) x {recipe.launch.nproc_per_node} rank(s); log {run_dir / 'logs' / f'slurm-{job}.out'}, "
          f"ranks in {run_dir / 'logs'}/rank-R.log; the job requeues itself after a preemption signal and resumes.", flush=True)
    return 0


def _intact(recipe, start):
    """The checkpoint to start from, after setting aside this run's damaged ones (a shard cut short or changed
    since its commit); another run's damaged checkpoint is refused, naming its previous intact one."""
    from launcher import checkpoint_integrity, resume
    from launcher.errors import UserError

    while start is not None and (broken := checkpoint_integrity.damage(start)):
        what = "; ".join(broken[:3]) + (f"; and {len(broken) - 3} more" if len(broken) > 3 else "")
        if not resume.continues(recipe, start):
            prev = checkpoint_integrity.previous_intact(start)
            offer = f"Its run's previous intact checkpoint is {prev}: set checkpoint.resume={prev}." if prev else "Its run has no intact earlier checkpoint."
            raise UserError(f"checkpoint.resume: checkpoint {start} is damaged ({what}). {offer}")
        moved = checkpoint_integrity.set_aside(start)
        print(f"checkpoint {start} is damaged ({what}); moved it to {moved} and continuing from the previous one, if any.", flush=True)
        start = resume.start_checkpoint(recipe)
    return start


def main(argv=None) -> int:
    parser = _parser()
    # Overrides may follow flags (`sft run r.yaml --nproc 2 train.lr=1e-4`): argparse leaves those over.
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = list(getattr(args, "overrides", [])) + rest
    for flag, key in (("nproc", "nproc_per_node"), ("nnodes", "nnodes"), ("node_rank", "node_rank"), ("rdzv_endpoint", "rdzv_endpoint")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"launch.{key}={getattr(args, flag)}")

    from launcher import checkpoint
    from launcher.errors import UserError
    from launcher.worker import _quiet_libraries

    _quiet_libraries()
    try:
        if args.command in ("generate", "chat"):
            if overrides:
                parser.error(f"unrecognized arguments: {' '.join(overrides)}")
            if args.command == "generate":
                return _generate(args)
            from launcher.chat import chat

            return chat(Path(args.model), args.max_new_tokens, args.temperature, args.top_p, args.system)
        if args.command == "export":
            return _export(args, overrides)
        if args.command == "plot":
            from launcher.plot import plot

            print(f"wrote {plot(Path(args.run_dir), args.out)}", flush=True)
            return 0
        if args.command == "submit":
            return _submit(args, overrides)
        if args.command == "run" and not any(o.startswith(("launch.nnodes=", "launch.node_rank=", "launch.rdzv_endpoint=")) for o in overrides):
            from launcher.launch.slurm import from_allocation

            overrides += from_allocation(os.environ)  # inside a multi-node srun step: be one node of it
        from launcher.plan import format_plan, make_plan
        from launcher.recipe import load_recipe

        recipe = load_recipe(args.recipe, overrides)
        plan = make_plan(recipe)
        text = format_plan(plan, recipe)
        print(text, flush=True)
        if args.command == "plan":
            return 0
        from launcher import hub, resume, rundir

        first_node = recipe.launch.node_rank == 0  # node 0 alone prepares the shared output_dir
        if first_node:
            rundir.lock(Path(recipe.output_dir))  # held until this process ends: a second run of this dir is refused
            rundir.check_output_dir(recipe, overwrite=args.overwrite)
            for partial in checkpoint.remove_partials(Path(recipe.output_dir)):
                print(f"removed {partial}: a checkpoint interrupted while saving (never committed)", flush=True)
        start = resume.start_checkpoint(recipe)
        if first_node:
            start = _intact(recipe, start)
        if start is not None:
            total = plan.schedule.total_steps
            from launcher.data.prepare import data_files

            changed = resume.check(recipe, start, plan.model_path, plan.schedule.batches.global_batch, total, plan.world_size, plan.classes,
                                   data_files(plan.files))
            step = checkpoint.read_state(start)["step"]
            if resume.finished(recipe, start, total):
                print(f"{recipe.output_dir} has finished: {start.name} is step {step} of {total}"
                      f"{' and final/ is its export' if recipe.export.on_finish else ''}. Nothing to do (a larger train.max_steps "
                      "would continue it; --overwrite trains again).", flush=True)
                return 0
            if resume.continues(recipe, start):
                print(f"resuming from {start} (step {step} of {total})" + (f"; changed since: {', '.join(changed)}" if changed else ""), flush=True)
            else:
                print(f"starting from {start} (step {step} of its run): its weights and optimizer moments, with this recipe's lr, "
                      f"betas, eps and weight decay, a fresh LR schedule and the data from its start, at step 0 of {total}"
                      + (f"; changed since: {', '.join(changed)}" if changed else ""), flush=True)
        if first_node:
            rundir.archive_logs(Path(recipe.output_dir))
            rundir.save_recipe(recipe)
            hub.record(Path(recipe.output_dir))
            (Path(recipe.output_dir) / "plan.txt").write_text(text + "\n")
        from launcher.launch.local import launch

        return launch(args.recipe, overrides, recipe)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
