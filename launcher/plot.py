"""Training curves from a run dir's metrics.jsonl: `sft plot RUN_DIR`, and output_dir/curves.png after a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.errors import UserError

# (panel title, keys drawn in it); a panel with no values in the run is left out.
PANELS = [
    ("loss", ("loss", "eval_loss")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)),
    ("eval accuracy", ("eval_accuracy", "eval_macro_f1", "eval_token_accuracy", "eval_exact_match")),
]


def read_metrics(path: Path) -> list:
    """The rows of metrics.jsonl; a line a killed run left half-written (or any unreadable line) is skipped."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def series(rows: list, key: str) -> tuple:
    """(steps, values) of one metric, by step; a step logged again (after a resume) keeps its last value."""
    points = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            points[row["step"]] = value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot(run_dir: Path, out: "Path | None" = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: give `sft plot` a run's output_dir (the directory with metrics.jsonl).")
    rows = read_metrics(path)
    panels = [(title, [(k, *series(rows, k)) for k in keys]) for title, keys in PANELS]
    panels = [(title, [s for s in lines if s[1]]) for title, lines in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise UserError(f"{path} has no logged steps yet: nothing to plot.")
    out = Path(out) if out is not None else run_dir / "curves.png"
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.2 * nrows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for key, steps, values in lines:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1 or title == "eval accuracy":
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def curves_after_run(run_dir: Path) -> None:
    """output_dir/curves.png at the end of a run; a plot that fails warns, it never fails the run."""
    try:
        plot(run_dir)
    except Exception as e:  # the run's results are already saved; a picture of them is not worth failing for
        print(f"warning: could not draw {Path(run_dir) / 'curves.png'}: {e}", file=sys.stderr, flush=True)
