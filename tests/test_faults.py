"""Faults with real processes: the run reports what failed, and nothing of a user's is lost."""

import os
from pathlib import Path

import pytest

from conftest import REPO, run_sft

QUICKSTART = "recipes/quickstart.yaml"


def _short(run_dir, cache_dir, *extra):
    return [f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=2", "train.eval_every=1", "train.eval_generate=0",
            "train.eval_at_start=false", "export.on_finish=false", "checkpoint.every_minutes=0", "checkpoint.signal_grace_s=5", *extra]


@pytest.mark.slow
def test_the_rank_that_failed_first_is_reported(tmp_path, cache_dir):
    # Rank 1 raises at its first evaluation; rank 0 then loses its peer (gloo) and the agent stops it.
    helper = REPO / "tests" / "helpers" / "crash_rank1"
    env = {"PYTHONPATH": os.pathsep.join([str(helper), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = run_sft(["run", QUICKSTART, "--nproc", "2", *_short(tmp_path / "run", cache_dir)], env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: rank 1 failed first" in proc.stderr, proc.stderr[-3000:]
    assert "rank-1.log" in proc.stderr and "ValueError: rank 1 broke during evaluation (test)" in proc.stderr
