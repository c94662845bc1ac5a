"""`sft submit`: render the sbatch script for a recipe and hand it to Slurm.

The script (launcher/slurm/sft.sbatch, or `slurm.template`) runs one srun task per node; each
task is `sft run RECIPE [overrides]`, which finds its node rank, the node count and the head
node in the step's environment (from_allocation), so Slurm jobs use the same launcher, checks and
resume as `sft run` on one box. Every value put
into the script is quoted here: a recipe value holding `$(...)`, backticks, quotes or a newline
stays text (in #SBATCH lines, where nothing expands, a newline is refused instead).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from launcher.errors import UserError

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _time_s(value: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def _directive_value(option: str, value) -> str:
    """`value` as it may stand in an #SBATCH line, where nothing expands: no line break, no whitespace."""
    text = str(value)
    if any(c in text for c in "\n\r\0"):
        raise UserError(f"slurm: the value for {option} ({text!r}) contains a line break, which would end the #SBATCH line and run the rest as shell; remove it.")
    if option != "extra_sbatch" and any(c.isspace() for c in text):
        raise UserError(f"slurm: the value for {option} ({text!r}) contains whitespace, which sbatch would split into other options; remove it.")
    return text


def check(recipe) -> None:
    """What would make the job fail or lie, refused before anything is queued."""
    sl, la = recipe.slurm, recipe.launch
    if sl.nodes < 1:
        raise UserError(f"slurm.nodes must be at least 1, got {sl.nodes}.")
    if sl.gpus_per_node and la.nproc_per_node != sl.gpus_per_node:
        raise UserError(
            f"slurm.gpus_per_node={sl.gpus_per_node} but launch.nproc_per_node={la.nproc_per_node}: one rank drives one GPU. "
            "Set them equal (e.g. --nproc 8 with slurm.gpus_per_node=8)."
        )
    if sl.time is not None:
        try:
            limit = _time_s(str(sl.time))
        except (ValueError, KeyError):
            raise UserError(f"slurm.time={sl.time!r} is not a Slurm time (minutes, H:M:S or D-H:M:S).") from None
        if limit <= sl.signal_before_end_s or limit <= recipe.checkpoint.signal_grace_s:
            raise UserError(
                f"slurm.time={sl.time} ({limit} s) is not longer than the warning before the end (slurm.signal_before_end_s="
                f"{sl.signal_before_end_s}) or the save grace (checkpoint.signal_grace_s={recipe.checkpoint.signal_grace_s:g}): "
                "the job would be told to stop as it starts. Ask for more time or lower those."
            )
    if sl.signal_before_end_s < recipe.checkpoint.signal_grace_s:
        raise UserError(
            f"slurm.signal_before_end_s={sl.signal_before_end_s} is shorter than checkpoint.signal_grace_s="
            f"{recipe.checkpoint.signal_grace_s:g}: the time limit would kill the job while it may still be saving. "
            "Raise slurm.signal_before_end_s or lower the grace."
        )


def render(recipe, recipe_path: str, overrides: list, workdir: Path) -> str:
    sl = recipe.slurm
    run_dir = Path(recipe.output_dir).resolve()
    options = [("--partition", sl.partition), ("--account", sl.account), ("--qos", sl.qos), ("--constraint", sl.constraint),
               ("--time", sl.time), ("--mem", sl.mem), ("--cpus-per-task", sl.cpus_per_task),
               ("--gpus-per-node", sl.gpus_per_node or None)]
    lines = [f"#SBATCH {k}={_directive_value(k, v)}" for k, v in options if v is not None]
    if sl.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [f"#SBATCH {_directive_value('extra_sbatch', extra)}" for extra in sl.extra_sbatch]
    for name in sl.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"slurm.env: {name!r} is not an environment variable name (letters, digits and _ only).")
    command = [sys.executable, "-m", "launcher", "run", str(Path(recipe_path).resolve()), *overrides]
    values = {
        "job_name": _directive_value("--job-name", recipe.name),
        "nodes": str(sl.nodes),
        "workdir": _directive_value("--chdir", workdir.resolve()),
        "log_dir": shlex.quote(str(run_dir / "logs")),
        "checkpoints": shlex.quote(str(run_dir / "checkpoints")),
        "signal_before_end_s": str(sl.signal_before_end_s),
        "sbatch_options": "\n".join(lines),
        "env_exports": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in sl.env.items()),
        "setup_lines": "\n".join(sl.setup),  # shell the user wrote to run: module load, source a venv
        "srun_args": " ".join(shlex.quote(a) for a in sl.srun_args),
        "sft_command": " ".join(shlex.quote(a) for a in command),
    }
    template = Path(sl.template).read_text() if sl.template else resources.files("launcher.slurm").joinpath("sft.sbatch").read_text()
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if unknown:
        raise UserError(
            f"slurm.template {sl.template or '(launcher/slurm/sft.sbatch)'}: unknown variable {{{{{unknown[0]}}}}}. The variables are: {', '.join(sorted(values))}."
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# The rendezvous port: 20000-31999, below Linux's default ephemeral range (32768-60999, where the
# kernel picks the local ports of outgoing connections, so one could already hold ours). Port =
# base + (7 x job id + step id) mod 12000: two steps get the same port only if their job ids differ
# by 1713 or more or their step ids by 7 or more (7 x 1712 + 6 < 12000), so the jobs of a sweep
# submitted together never collide on a shared node (20000 + job mod 20000 made ids 20000 apart
# collide, and sat in the ephemeral range).
PORT_BASE, PORT_SPAN, PORT_STRIDE = 20000, 12000, 7
PORT_ENV = "SFT_RDZV_PORT"  # set it (slurm.env, or export before srun) to choose the port yourself


def rdzv_port(env) -> int:
    """The port node 0 listens on for this step: SFT_RDZV_PORT, else derived from job and step id."""
    if env.get(PORT_ENV):
        text = env[PORT_ENV]
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise UserError(f"{PORT_ENV}={text!r} is not a TCP port (1-65535); set it to a free port, the same on every node.")
        return int(text)
    step = env.get("SLURM_STEP_ID", "0")  # not a number outside srun ("batch", "extern")
    return PORT_BASE + (PORT_STRIDE * int(env["SLURM_JOB_ID"]) + (int(step) if step.isdigit() else 0)) % PORT_SPAN


def head_node(env) -> str:
    """The step's first node. Not the allocation's: a step on some of its nodes would meet on a node
    outside the step and wait there forever. Not `hostname` either (which may say 127.0.0.1)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return names.stdout.split()[0]


def from_allocation(env) -> list:
    """Inside an srun step on several nodes (one task per node): the overrides that make `sft run`
    one node of it. Node count and node id are the step's (srun sets them so), the head node is the
    step's first node (head_node), the port comes from job and step id (rdzv_port)."""
    try:
        nnodes, node = int(env.get("SLURM_STEP_NUM_NODES") or env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
        tasks = int(env["SLURM_STEP_NUM_TASKS"])  # set in srun steps only, not in the batch script itself
    except (KeyError, ValueError):
        return []
    if nnodes < 2:
        return []
    if tasks != nnodes:
        raise UserError(
            f"sft run inside a Slurm step of {tasks} tasks on {nnodes} nodes: run one task per node "
            "(srun --ntasks-per-node=1); each starts launch.nproc_per_node ranks itself."
        )
    return [f"launch.nnodes={nnodes}", f"launch.node_rank={node}", f"launch.rdzv_endpoint={head_node(env)}:{rdzv_port(env)}"]


def submit(script: Path) -> str:
    """Queue `script` with sbatch; returns the job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch was not found on PATH: run `sft submit` on a Slurm login node (or load the Slurm module), or use --dry-run to only write the script.")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
