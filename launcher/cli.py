"""The `sft` command: plan and run (submit and export arrive with Slurm and export support)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """sft plan RECIPE [key=value ...]       validate the recipe, data and model; print the plan
sft run  RECIPE [key=value ...]       train on this machine (--nproc N ranks)"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft", description="Fine-tune causal LLMs from one YAML recipe.", usage=USAGE)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("plan", "run"):
        s = sub.add_parser(name)
        s.add_argument("recipe", help="path of the YAML recipe")
        s.add_argument("overrides", nargs="*", help="recipe overrides as key=value (OmegaConf dotlist)")
        s.add_argument("--nproc", type=int, help="ranks on this machine (same as launch.nproc_per_node=N)")
        if name == "run":
            s.add_argument("--overwrite", action="store_true", help="delete an earlier run's files in output_dir and start over")
    return p


def main(argv=None) -> int:
    parser = _parser()
    # Overrides may follow flags (`sft run r.yaml --nproc 2 train.lr=1e-4`): argparse leaves those over.
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = list(args.overrides) + rest + ([f"launch.nproc_per_node={args.nproc}"] if args.nproc else [])

    from launcher.errors import UserError
    from launcher.worker import _quiet_libraries

    _quiet_libraries()
    try:
        from launcher.plan import format_plan, make_plan
        from launcher.recipe import load_recipe

        recipe = load_recipe(args.recipe, overrides)
        plan = make_plan(recipe)
        text = format_plan(plan, recipe)
        print(text, flush=True)
        if args.command == "plan":
            return 0
        from launcher import rundir

        rundir.check_output_dir(recipe, overwrite=args.overwrite)
        rundir.save_recipe(recipe)
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
