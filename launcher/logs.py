"""What rank 0 writes: metrics.jsonl for machines (and the trackers of logging.report_to), a progress line or bar for people."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line; flushed each write so a killed run keeps its history.
    `trackers` (launcher.trackers.Trackers) receive every row too."""

    def __init__(self, path: Path, enabled: bool, trackers=None):
        self.enabled = enabled
        self.path = path
        self.trackers = trackers

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.trackers is not None:
                self.trackers.log(row)

    def close(self, finished: bool = True) -> None:
        if self.trackers is not None:
            self.trackers.close(finished)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    """A tqdm bar on a terminal; under the launcher (output captured to files) one line per log step."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def step(self, step: int, row: dict, eta_s: float) -> None:
        if not self.enabled:
            return
        stats = f"loss {row['loss']:.4f} lr {row['lr']:.2e} tok/s {row['tokens_per_s']:.0f}"
        if "mfu" in row:
            stats += f" mfu {row['mfu']:.1%} mem {row['peak_mem_gib']:.1f}GiB"
        if self.bar is not None:
            self.bar.set_postfix_str(stats, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        filled = int(20 * step / self.total)
        print(f"step {step}/{self.total} [{'#' * filled}{'.' * (20 - filled)}] {stats} eta {_duration(eta_s)}", file=sys.stderr, flush=True)

    def eval(self, step: int, result: dict) -> None:
        if self.enabled:
            text = " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))  # tables go to metrics.jsonl
            (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr, flush=True))(f"eval at step {step}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
