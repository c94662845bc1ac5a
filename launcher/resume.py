"""Resuming: which checkpoint a run continues from, whether it fits the recipe, and what changed.

The rule, for `sft run`, for a restart by the elastic agent and for a requeued Slurm job alike:
a run continues from its own output_dir's latest complete checkpoint; only when it has none does
`checkpoint.resume: PATH` name where to start; otherwise it starts at step 0. `never` refuses, at
launch, an output_dir that already has checkpoints.

Continuing its own checkpoint restores everything (weights, optimizer, schedule, step, RNG), so the
run ends exactly as an uninterrupted one. Another run's checkpoint only initialises a new run: its
weights and optimizer moments, with this recipe's lr, betas, eps and weight decay, a fresh LR
schedule, step 0 and the data from its start (the step counter would otherwise skip that many
batches of this run's data). trainer_state.json records it as `init_from`.

Engines read their own shards (engines/*.load_checkpoint); the loop puts back the LR scheduler
and each rank's RNG (train.py); the data position is the step (data/batches.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from launcher import checkpoint, checkpoint_weights
from launcher.errors import UserError
from launcher.recipe import to_dict

# What a run continuing in its own output_dir may change besides those: how long it trains and evaluates.
_EXTENDABLE = ("train.max_steps", "train.epochs", "train.eval_")
_LORA_SHAPE = ("enabled", "r", "alpha", "target_modules", "modules_to_save", "use_rslora", "use_dora")


def start_checkpoint(recipe) -> Optional[Path]:
    """This run's latest complete checkpoint; else checkpoint.resume's path; else None (step 0)."""
    own = checkpoint.latest(Path(recipe.output_dir))
    mode = recipe.checkpoint.resume
    if own is not None or mode in ("auto", "never"):
        return own
    try:
        return checkpoint.resolve(Path(mode))
    except UserError as e:
        raise UserError(f"checkpoint.resume: {e}") from None


def continues(recipe, ckpt: Path) -> bool:
    """True when `ckpt` is this output_dir's own (a restart, a requeue, a longer run); False for another run's."""
    return ckpt.resolve().parent.parent == Path(recipe.output_dir).resolve()


def optimizer_settings(optimizer) -> list:
    """Each param group's settings (lr, betas, eps, weight_decay, ...), as this recipe made them."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def keep_settings(optimizer, settings: list) -> None:
    """After loading another run's optimizer state: its moments stay, this recipe's settings come back
    (Optimizer.load_state_dict restores the saved run's; DESIGN.md, known traps)."""
    for group, values in zip(optimizer.param_groups, settings, strict=True):
        group.update(values)
        group.pop("initial_lr", None)  # the saved run's base lr, which the new LR scheduler would keep


def check(recipe, ckpt: Path, model_path: Path, global_batch: int, total_steps: int, world_size: int, classes=None, data_files=None) -> list:
    """Raise UserError naming everything that keeps `ckpt` from continuing `recipe`; otherwise
    return the recipe keys that changed since the checkpoint (in its own output_dir they take effect from its
    step on; another run's checkpoint only initialises this one, see the module docstring).
    `classes`: a classifier's label set now (collected labels change when the data does).
    `data_files`: {path: content digest} of the data now (data.prepare.data_files)."""
    from launcher.rundir import FREE_KEYS, differences

    own = continues(recipe, ckpt)

    state = checkpoint.read_state(ckpt)
    old = yaml.safe_load((ckpt / "recipe.yaml").read_text()) or {}
    new = to_dict(recipe)
    own = ckpt.resolve().parent.parent == Path(recipe.output_dir).resolve()
    problems = []

    def compare(key: str, then, now) -> None:
        if then != now:
            problems.append(f"{key} was {then!r} there and is {now!r} now")

    st = recipe.strategy
    compare("strategy.backend", state["backend"], st.backend)
    if state["backend"] == st.backend == "deepspeed":
        compare("strategy.zero_stage", state.get("zero_stage"), st.zero_stage)
        if state["world_size"] != world_size:
            problems.append(
                f"it was written by {state['world_size']} ranks and this run has {world_size}: DeepSpeed's ZeRO shards "
                "only load on the world size that wrote them (use that many ranks, or `sft export` the checkpoint and "
                "start a new run from the exported model, with a fresh optimizer)"
            )
    for key in _LORA_SHAPE:
        compare(f"lora.{key}", old.get("lora", {}).get(key), new["lora"][key])
    compare("model.dtype", old.get("model", {}).get("dtype"), new["model"]["dtype"])
    problems += checkpoint_weights.model_differences(ckpt / "hf", model_path)
    info = ckpt / "classification.json"
    labels_then = json.loads(info.read_text())["labels"] if info.is_file() else None
    labels_now = classes.names if classes is not None else None
    if labels_then != labels_now:
        problems.append(f"its classes were {labels_then} and this run's are {labels_now} (class ids would change meaning)")
    if own and "global_batch" in state and state["global_batch"] != global_batch:
        problems.append(
            f"a step took {state['global_batch']} sequences there and takes {global_batch} now (micro batch x accumulation "
            "x ranks): the data position and the LR schedule are counted in steps. Keep the global batch, e.g. with "
            "train.global_batch_size"
        )
    if own:  # continuing this run: its data must be the data it trained on
        problems += _data_changes(state.get("data_files") or {}, data_files or {})
    if own and state["step"] > total_steps:
        problems.append(f"it is at step {state['step']}, past this recipe's last step {total_steps} (raise train.max_steps or train.epochs)")
    if problems:
        raise UserError(
            f"cannot resume from checkpoint {ckpt}: " + "; ".join(problems) + ". Resume with the settings it was written with, "
            "or start a new run (another output_dir, or --overwrite)."
        )
    changed = [k for k in differences(old, new) if not k.startswith(FREE_KEYS)]
    foreign = [k for k in changed if not k.startswith(_EXTENDABLE)]
    if own and foreign:
        raise UserError(
            f"output_dir {recipe.output_dir} holds a different run (recipe differs in: {', '.join(foreign[:8])}); its latest "
            f"checkpoint is {ckpt.name}. Nothing was changed. Choose another output_dir (to start from that checkpoint with "
            f"new settings, add checkpoint.resume={ckpt}), or pass --overwrite to delete that run's files and start over."
        )
    return changed


def _data_changes(then: dict, now: dict) -> list:
    """A file the checkpoint trained on whose content is another now (checkpoints before data digests: none)."""
    return [
        f"data file {path} is not the one it trained on (its content changed: {then[path]} there, {now[path]} now), so every "
        "later step would draw other examples and a data.eval_fraction split would move eval rows into training; put "
        "the file back as it was"
        for path in then
        if path in now and now[path] != then[path]
    ]


def finished(recipe, ckpt: Optional[Path], total_steps: int) -> bool:
    """True when the run in output_dir has trained every step and exported (when it is asked to)."""
    if ckpt is None or not continues(recipe, ckpt) or checkpoint.read_state(ckpt)["step"] != total_steps:
        return False
    if not recipe.export.on_finish:
        return True
    report = Path(recipe.output_dir) / "final" / "export.json"
    return report.is_file() and json.loads(report.read_text()).get("source_checkpoint") == str(ckpt.resolve())


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows after the resumed step: the resumed run logs those steps again."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    if step == 0:  # starting over: an earlier attempt's step-0 eval would be logged twice
        path.unlink()
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)
