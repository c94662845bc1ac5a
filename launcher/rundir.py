"""The run directory: what is in it, and the rule that nothing of a user's is overwritten silently."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from launcher import checkpoint
from launcher.errors import UserError
from launcher.recipe import Recipe, to_dict

# What a run writes; `--overwrite` removes only these.
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "logs", "final", "checkpoints", "plan.txt", "submit.sbatch", "hub.json",
             "curves.png", "trackers.json", "tensorboard", "wandb")


# Recipe keys that may differ between attempts of one run: where it runs, how it saves, logs and exports.
FREE_KEYS = ("name", "output_dir", "checkpoint.", "logging.", "launch.", "export.", "slurm.", "data.cache_dir")

# Keys whose values are secrets, and values that look like well-known token formats.
_SECRET_KEY = re.compile(r"(?i)(^|_)(token|secret|passw(or)?d|api_?key|access_?key|private_?key|credentials?|auth)$|^(hf|wandb|github|gh)_?token$")
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[bp]-[A-Za-z0-9-]{10,})$")
REDACTED = "***REDACTED***"


def _redact(node):
    if isinstance(node, dict):
        return {k: (REDACTED if isinstance(v, str) and _SECRET_KEY.search(str(k)) else _redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    if isinstance(node, str) and _SECRET_VALUE.match(node):
        return REDACTED
    return node


def to_yaml(recipe: Recipe, redact: bool = True) -> str:
    """The resolved recipe as YAML; secrets are replaced so a run dir can be shared."""
    data = to_dict(recipe)
    return OmegaConf.to_yaml(OmegaConf.create(_redact(data) if redact else data))


def differences(old: dict, new: dict, prefix: str = "") -> list:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b and a != REDACTED:
            out.append(f"{prefix}{k}")
    return out


def check_output_dir(recipe: Recipe, overwrite: bool) -> None:
    """Refuse to reuse a run dir that holds another run or someone's files, unless told to."""
    out = Path(recipe.output_dir)
    _check_writable(out)
    if not out.exists() or not any(out.iterdir()):
        return
    saved = out / "recipe.yaml"
    if not saved.is_file():
        ours = [p.name for p in out.iterdir() if p.name in RUN_FILES]
        if not ours:
            raise UserError(f"output_dir {out} exists and holds files that are not an sft-launcher run. Choose another output_dir; nothing there was touched.")
    if overwrite:
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return
    own = checkpoint.latest(out)
    if own is not None:
        if recipe.checkpoint.resume == "never":
            raise UserError(
                f"output_dir {out} has checkpoints (latest: {own.name}) and checkpoint.resume is never. Nothing was changed. "
                "Use checkpoint.resume=auto to continue that run, --overwrite to start over, or another output_dir."
            )
        return  # resume.check decides whether its checkpoint can continue this recipe
    if saved.is_file():
        diff = [k for k in differences(yaml.safe_load(saved.read_text()) or {}, to_dict(recipe)) if not k.startswith(FREE_KEYS)]
        if not diff:
            return  # this same recipe, stopped before its first checkpoint: it starts again at step 0
        what = f"a different run (recipe differs in: {', '.join(diff[:8])})"
    else:
        what = "files of an earlier run"
    raise UserError(
        f"output_dir {out} already holds {what}. Nothing was changed. Choose another output_dir "
        "(e.g. output_dir=runs/new-name), or pass --overwrite to delete that run's files and start over."
    )


def _check_writable(out: Path) -> None:
    """output_dir, or the nearest of its parents that exists, must be a directory this user can write."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"is inside {existing}, which is a file"
        raise UserError(f"output_dir {out} {what}, not a directory. Choose another output_dir; nothing was touched.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out}: {existing} is not writable by this user. Choose another output_dir or fix its permissions.")


def lock(out: Path) -> int:
    """Hold an exclusive lock on output_dir for this process's life, so a second `sft run` of it is refused
    before it changes anything. flock on the directory itself: nothing is added to it, and the lock goes
    with the process, however it ends. Returns the descriptor (keep it open)."""
    import fcntl

    out = Path(out)
    _check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"output_dir {out} is in use by another `sft run` on this machine. Nothing was changed. Wait for it to "
                        "finish (or stop it), or choose another output_dir.") from None
    return fd


def archive_logs(run_dir: Path) -> None:
    """Move an earlier attempt's logs/rank-*.log files to logs/attempt-N/, so a rerun does not overwrite them."""
    logs = Path(run_dir) / "logs"
    files = [p for p in logs.iterdir() if p.is_file() and p.name.startswith("rank-")] if logs.is_dir() else []  # not Slurm's own
    if not files:
        return
    n = 1 + sum(1 for p in logs.iterdir() if p.is_dir() and p.name.startswith("attempt-"))
    dest = logs / f"attempt-{n}"
    dest.mkdir()
    for p in files:
        p.rename(dest / p.name)


def save_recipe(recipe: Recipe) -> Path:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(to_yaml(recipe, redact=True))
    return path
