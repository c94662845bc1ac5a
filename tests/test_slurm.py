"""`sft submit` on a real two-node Slurm cluster (slurmctld + 2 slurmd on loopback), and the
checks that refuse a job before anything is queued."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import slurm_cluster
from conftest import REPO, run_sft
from launcher.errors import UserError
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


def test_usr1_on_one_node_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(cluster, tmp_path, cache_dir):
    """--signal=USR1@N reaches the nodes at different times (DESIGN.md): here only rank 1 (node 1) is
    signalled, so rank 0's stop checkpoint says "a signal on another rank". And srun reports 137, as when
    --kill-on-bad-exit ends a peer that was still exiting, not 75: the script requeues from the checkpoint."""
    from test_resume import _worker_pids

    common = ["train.max_steps=40", "checkpoint.keep_last=5", "export.on_finish=false"]
    run_dir, as_killed = tmp_path / "run", tmp_path / "as-killed.sh"
    as_killed.write_text('#!/bin/bash\n"$@"; status=$?\n[ "$status" -eq 75 ] && exit 137\nexit "$status"\n')
    as_killed.chmod(0o755)
    # Both "nodes" share this host's cores, as the reference's 2 ranks do: one thread per rank in both, so
    # the matmuls sum in the same order and the weights can be compared bitwise.
    job = _job(_submit(run_dir, cache_dir, *common, "slurm.env={OMP_NUM_THREADS: '1'}", f"slurm.srun_args=[{as_killed}]", env=cluster))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 5):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    os.kill(_worker_pids(run_dir)[1], signal.SIGUSR1)
    slurm_cluster.release_requeued(job, cluster)
    assert slurm_cluster.wait_until_done(job, cluster) == "COMPLETED"
    out = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert "exit code 137" in out and "requeueing job" in out and "(restart 1)" in out
    assert "resuming from" in (run_dir / "logs" / f"slurm-{job}-node0.out").read_text()
    stops = [json.loads((c / "trainer_state.json").read_text()) for c in (run_dir / "checkpoints").glob("step-*")]
    assert any(s["stopped_by"] == "a signal on another rank" and s["step"] < 40 for s in stops)

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


def test_rendezvous_port_stays_below_the_ephemeral_range_and_apart_for_nearby_jobs():
    from launcher.launch.slurm import rdzv_port

    def port(job, step=0):
        return rdzv_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)})

    ports = [port(job, step) for job in range(100000, 101713) for step in range(7)]
    assert all(20000 <= p < 32768 for p in ports)  # Linux's ephemeral range starts at 32768
    assert len(set(ports)) == len(ports)  # no two steps of 1713 consecutive jobs meet
    assert port(100000) != port(120000)  # 20000 + job % 20000 gave both 20000
    assert rdzv_port({"SLURM_JOB_ID": "7", "SFT_RDZV_PORT": "41000"}) == 41000
    with pytest.raises(UserError, match="SFT_RDZV_PORT='70000' is not a TCP port"):
        rdzv_port({"SLURM_JOB_ID": "7", "SFT_RDZV_PORT": "70000"})


def test_a_step_meets_on_its_own_first_node(cluster):
    """A 2-node allocation: a step on n2 alone names n2 as head, a 2-node step n1; ports follow the step."""
    probe = ("import json, os; from launcher.launch.slurm import from_allocation, head_node, rdzv_port; "
             "print(json.dumps([os.environ['SLURM_STEP_ID'], head_node(os.environ), rdzv_port(os.environ), from_allocation(os.environ)]))")
    steps = f"srun -N1 -n1 -w n2 {sys.executable} -c \"$PROBE\" && srun -N2 --ntasks-per-node=1 {sys.executable} -c \"$PROBE\""
    proc = subprocess.run(["salloc", "-N2", "bash", "-c", steps], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, **cluster, "PROBE": probe})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    (one, *two), ports = sorted(rows, key=lambda r: (r[0], r[3])), {r[2] for r in rows}
    assert one[:2] == ["0", "n2"] and one[3] == []  # one node: nothing to meet; the allocation's first is n1
    assert [r[1] for r in two] == ["n1", "n1"] and len(ports) == 2
    endpoint = f"launch.rdzv_endpoint=n1:{two[0][2]}"
    assert sorted(r[3] for r in two) == [["launch.nnodes=2", f"launch.node_rank={i}", endpoint] for i in (0, 1)]



@pytest.mark.slow
def test_the_example_scripts_run_sft_run_and_torchrun_per_node(cluster, tmp_path, cache_dir):
    """slurm/sft-run.sbatch and slurm/torchrun.sbatch as shipped, less their GPU and CPU requests (the
    loopback nodes have 2 CPUs and no GPUs; SLURM_GPUS_ON_NODE=1 stands in for the GPU count): plan,
    then one `sft run` (or torchrun) per node. Both jobs run at once, sharing the two nodes."""
    env = {**os.environ, **cluster, "SLURM_GPUS_ON_NODE": "1"}
    jobs = {}
    for name in ("sft-run", "torchrun"):
        script = tmp_path / f"{name}.sbatch"
        script.write_text("".join(line for line in (REPO / f"slurm/{name}.sbatch").read_text().splitlines(keepends=True)
                                  if not line.startswith(("#SBATCH --gpus-per-node", "#SBATCH --cpus-per-task"))))
        args = [QUICKSTART, f"output_dir={tmp_path / name}", f"data.cache_dir={cache_dir}", "train.max_steps=2", "train.eval_generate=0",
                "train.eval_every=0", "train.eval_at_start=false", "logging.every_steps=1"]
        proc = subprocess.run(["sbatch", f"--output={tmp_path}/{name}-%j.out", str(script), *args], cwd=REPO, env=env, capture_output=True, text=True)
        jobs[name] = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    for name, job in jobs.items():
        state = slurm_cluster.wait_until_done(job, cluster)
        log = (tmp_path / f"{name}-{job}.out").read_text()
        assert state == "COMPLETED", log[-3000:]
        assert "world size 2 (1 per node x 2 nodes)" in log and "done: final train loss" in log, log[-3000:]
        assert json.loads((tmp_path / name / "final" / "export.json").read_text())["step"] == 2
