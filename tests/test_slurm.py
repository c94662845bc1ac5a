"""`sft submit` on a real two-node Slurm cluster (slurmctld + 2 slurmd on loopback), and the
checks that refuse a job before anything is queued."""

import json
import os
import re
import subprocess
import time

import pytest

import slurm_cluster
from conftest import REPO, run_sft
from test_resume import assert_same_weights

QUICKSTART = "recipes/quickstart.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield env
    slurm_cluster.stop(env)


def _submit(run_dir, cache_dir, *extra, env=None):
    args = ["submit", QUICKSTART, f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", "train.eval_generate=0",
            "train.eval_every=0", "logging.every_steps=1", "slurm.nodes=2", *extra]
    return run_sft(args, env=env)


def _job(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def test_submit_runs_a_two_node_zero3_lora_job_and_values_stay_inert(cluster, tmp_path, cache_dir):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    nasty = f"$(touch {marker}) `touch {marker}` \"'; touch {marker}"
    proc = _submit(run_dir, cache_dir, "train.max_steps=4", "strategy.backend=deepspeed", "strategy.zero_stage=3",
                   "lora.enabled=true", f"slurm.env={{SFT_TEST_VALUE: {json.dumps(nasty)}}}", env=cluster)
    job = _job(proc)
    assert slurm_cluster.wait_until_done(job, cluster) == "COMPLETED"
    assert "on n[1-2]" in (run_dir / "logs" / f"slurm-{job}.out").read_text()
    for node in (0, 1):  # each node's `sft run` has its own log
        assert "world size 2 (1 per node x 2 nodes)" in (run_dir / "logs" / f"slurm-{job}-node{node}.out").read_text()
    assert json.loads((run_dir / "final" / "export.json").read_text())["merged"]
    assert not marker.exists()  # the value reached the job as text, never as a command
    assert f"export SFT_TEST_VALUE={nasty!r}"[:20] in (run_dir / "submit.sbatch").read_text()


def test_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(cluster, tmp_path, cache_dir):
    common = ["train.max_steps=40", "checkpoint.keep_last=5", "export.on_finish=false"]
    run_dir = tmp_path / "run"
    # Both "nodes" share this host's cores, as the reference's 2 ranks do: one thread per rank in both, so
    # the matmuls sum in the same order and the weights can be compared bitwise.
    job = _job(_submit(run_dir, cache_dir, *common, "slurm.env={OMP_NUM_THREADS: '1'}", env=cluster))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 5):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env={**os.environ, **cluster})
    slurm_cluster.release_requeued(job, cluster)
    assert slurm_cluster.wait_until_done(job, cluster) == "COMPLETED"
    out = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert "requeueing job" in out and "(restart 1)" in out
    assert "resuming from" in (run_dir / "logs" / f"slurm-{job}-node0.out").read_text()
    stops = [json.loads((c / "trainer_state.json").read_text()) for c in (run_dir / "checkpoints").glob("step-*")]
    assert any(s["stopped_by"] == "SIGUSR1" and s["step"] < 40 for s in stops)

    reference = tmp_path / "reference"  # the same 2-rank run on one node, never interrupted
    proc = run_sft(["run", QUICKSTART, f"output_dir={reference}", f"data.cache_dir={cache_dir}", "train.eval_generate=0",
                    "train.eval_every=0", "--nproc", "2", *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(run_dir / "checkpoints" / "step-000040", reference / "checkpoints" / "step-000040")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["slurm.gpus_per_node=8", "--nproc", "4"], "slurm.gpus_per_node=8 but launch.nproc_per_node=4"),
        (["slurm.time=00:02:00"], "slurm.time=00:02:00 (120 s) is not longer than"),
        (["slurm.signal_before_end_s=60"], "slurm.signal_before_end_s=60 is shorter than checkpoint.signal_grace_s=180"),
        (["slurm.partition=gpu rm -rf /"], "contains whitespace"),
        (["RECIPE_WITH_NEWLINE"], "contains a line break"),
        (["slurm.template=tests/data/bad.sbatch"], "unknown variable {{gpu_count}}"),
    ],
)
def test_submit_refuses_before_queueing(extra, message, tmp_path, cache_dir):
    template = tmp_path / "bad.sbatch"
    template.write_text("#!/bin/bash\n#SBATCH --nodes={{nodes}}\n#SBATCH --gpus={{gpu_count}}\n{{sft_command}}\n")
    extra = [e.replace("tests/data/bad.sbatch", str(template)) for e in extra]
    args = ["submit", QUICKSTART, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", "slurm.nodes=2"]
    if extra == ["RECIPE_WITH_NEWLINE"]:  # a YAML file can hold a real newline; a command-line override cannot
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f'extends: {REPO / QUICKSTART}\nslurm:\n  extra_sbatch: ["--comment=x\\nrm -rf /"]\n')
        args[1], extra = str(recipe), []
    proc = run_sft(args + extra)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "submit.sbatch").exists()


def test_submit_without_sbatch_says_so(tmp_path, cache_dir):
    proc = _submit(tmp_path / "run", cache_dir, env={"PATH": str(tmp_path)})  # no sbatch on PATH
    assert proc.returncode == 2 and "sbatch was not found on PATH" in proc.stderr
    assert (tmp_path / "run" / "submit.sbatch").is_file()  # written for inspection; nothing queued
