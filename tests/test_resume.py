"""Resume and faults with real processes: a resumed or interrupted run ends with exactly (bitwise)
the weights of an uninterrupted run, on ddp, fsdp and ZeRO-3, with and without LoRA.

Every run here trains the same 24 steps on 2 ranks with a checkpoint every 8. For each engine one
uninterrupted reference run is made once (module fixture); each test interrupts a run another way
(resume from a path, SIGUSR1, SIGKILL of one worker, a kill between shards and commit) and
compares the trained tensors of its last checkpoint with the reference's.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_sft

QUICKSTART = "recipes/quickstart.yaml"
STEPS, EVERY = 24, 8
CONFIGS = {
    "ddp": ["strategy.backend=ddp"],
    "ddp-lora": ["strategy.backend=ddp", "lora.enabled=true"],
    "fsdp": ["strategy.backend=fsdp"],
    "fsdp-lora": ["strategy.backend=fsdp", "lora.enabled=true"],
    "zero3": ["strategy.backend=deepspeed", "strategy.zero_stage=3"],
    "zero3-lora": ["strategy.backend=deepspeed", "strategy.zero_stage=3", "lora.enabled=true"],
}


def _args(run_dir, cache_dir, config, *extra, nproc=2):
    # lora dropout 0.05 stays on: resuming must restore each rank's RNG for the dropout masks to match.
    return ["run", QUICKSTART, "--nproc", str(nproc), f"output_dir={run_dir}", f"data.cache_dir={cache_dir}",
            f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=3", "train.lr=1e-2",
            "train.gradient_accumulation_steps=null", "train.global_batch_size=32", "train.eval_generate=0", "train.eval_at_start=false", "logging.every_steps=1",
            "export.on_finish=false", *CONFIGS[config], *extra]


def _start(args, log: Path, env=None) -> subprocess.Popen:
    """`sft run` in the background, as a user would start it; output goes to `log`."""
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def _wait_for(predicate, proc, timeout=300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the moment the test waits for"
        time.sleep(0.01)
    raise AssertionError("timed out")


def _worker_pids(run_dir: Path) -> dict:
    """{rank: pid} of this run's worker processes, found in /proc like any process of a user's."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"launcher.worker" in cmd and f"output_dir={run_dir}".encode() in cmd:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def trained_tensors(ckpt: Path) -> dict:
    """Every trained tensor of a checkpoint, read back without the launcher's own reader."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["backend"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "model"), tag="deepspeed", exclude_frozen_parameters=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(ckpt / "model"), f"{d}/all.pt")
        return torch.load(f"{d}/all.pt", weights_only=False)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = trained_tensors(a), trained_tensors(b)
    assert ta.keys() == tb.keys() and ta
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} of {len(ta)} tensors differ, e.g. {different[:3]}"


def _losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _last(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step-{STEPS:06d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    made = {}

    def get(config: str) -> Path:
        if config not in made:
            run_dir = tmp_path_factory.mktemp(f"ref-{config}") / "run"
            proc = run_sft(_args(run_dir, cache_dir, config))
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[config] = run_dir
        return made[config]

    return get


def _restore(ref: Path, run_dir: Path, step: int) -> Path:
    """A copy of run dir `ref` as it was at `step` (as from a backup): its later checkpoints are gone."""
    shutil.copytree(ref, run_dir, ignore=shutil.ignore_patterns("logs"))
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        if int(ckpt.name.removeprefix("step-")) > step:
            shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:06d}")
    return run_dir / "checkpoints" / f"step-{step:06d}"


@pytest.mark.parametrize("config", ["ddp", "zero3-lora"])  # fsdp: the kill test below (fsdp-lora) and the reshard test
def test_resume_in_its_own_run_dir_is_bitwise_exact(config, reference, tmp_path, cache_dir):
    ref = reference(config)
    run_dir = tmp_path / "run"
    start = _restore(ref, run_dir, EVERY)
    proc = run_sft(_args(run_dir, cache_dir, config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {start} (step {EVERY} of {STEPS})" in proc.stdout
    assert_same_weights(_last(run_dir), _last(ref))
    losses, ref_losses = _losses(run_dir), _losses(ref)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(losses[s] == ref_losses[s] for s in losses)


def test_a_start_from_another_runs_checkpoint_takes_this_recipes_settings(reference, tmp_path, cache_dir):
    """checkpoint.resume: PATH of another run: its weights and AdamW moments, with this recipe's lr, betas and
    weight decay, a fresh LR schedule, step 0 and the data from its start (here with another global batch)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import get_scheduler

    ref = reference("ddp")
    start = ref / "checkpoints" / f"step-{EVERY:06d}"
    run_dir, steps = tmp_path / "run", 4
    new = ["train.lr=2e-3", "train.adam_beta2=0.99", "train.weight_decay=0.5", "train.warmup_steps=2", "train.global_batch_size=16",
           f"train.max_steps={steps}"]
    proc = run_sft(_args(run_dir, cache_dir, "ddp", f"checkpoint.resume={start}", *new, nproc=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"starting from {start} (step {EVERY} of its run)" in proc.stdout and f"at step 0 of {steps}; changed since: "
            "train.adam_beta2, train.global_batch_size, train.lr, train.max_steps, train.warmup_steps, train.weight_decay" in proc.stdout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"checkpoint": str(start.resolve()), "step": EVERY} == rows[0]["init_from"]
    # The logged lr is this recipe's schedule from its start.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4] and [r["lr"] for r in trained] == pytest.approx(expected, rel=1e-9)
    assert trained[0]["loss"] < _losses(ref)[1] - 1  # the first step already has the checkpoint's weights
    last = run_dir / "checkpoints" / f"step-{steps:06d}"
    assert json.loads((last / "trainer_state.json").read_text())["init_from"] == rows[0]["init_from"]
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(last / "model"), f"{d}/all.pt")
        optim = torch.load(f"{d}/all.pt", weights_only=False)["optim"]
    groups = optim["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(tuple(g["betas"]) == (0.9, 0.99) for g in groups)
    assert all(g["initial_lr"] == 2e-3 for g in groups)
    assert {float(s["step"]) for s in optim["state"].values()} == {EVERY + steps}  # the moments went on from the checkpoint's

    # From now on the run dir's own checkpoints win, and it is its own run (a step of 16 sequences).
    own = run_sft(_args(run_dir, cache_dir, "ddp", f"checkpoint.resume={start}", *new[:-2], "train.max_steps=8", nproc=1))
    assert own.returncode == 2 and "a step took 16 sequences there and takes 32 now" in own.stderr, own.stderr[-3000:]


def test_sigusr1_checkpoints_exits_resumable_and_rerun_matches(reference, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = _args(run_dir, cache_dir, "ddp-lora")
    proc = _start(args, tmp_path / "first.log")
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(_losses(run_dir)) >= 10, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, (tmp_path / "first.log").read_text()[-3000:]
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["stopped_by"] == "SIGUSR1" and 10 <= state["step"] < STEPS
    assert "Run the same command again to resume" in (tmp_path / "first.log").read_text()

    again = run_sft(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {latest}" in again.stdout
    assert_same_weights(_last(run_dir), _last(reference("ddp-lora")))
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))  # the log has each step once
    assert (run_dir / "logs" / "attempt-1" / "rank-0.log").is_file()  # the first attempt's logs were kept


def test_sigkill_of_one_zero3_worker_restarts_and_matches(reference, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = _start(_args(run_dir, cache_dir, "zero3", "launch.max_restarts=1"), tmp_path / "run.log")
    second = run_dir / "checkpoints" / f"step-{2 * EVERY:06d}" / "COMPLETE"
    _wait_for(second.is_file, proc)
    os.kill(_worker_pids(run_dir)[1], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert (run_dir / "logs" / "rank-1.restart-1.log").is_file()  # the agent did restart the group
    assert f"step-{2 * EVERY:06d} (step {2 * EVERY} of {STEPS})" in (run_dir / "logs" / "rank-0.restart-1.log").read_text()
    assert_same_weights(_last(run_dir), _last(reference("zero3")))


def test_kill_between_shards_and_commit_resumes_from_the_previous_checkpoint(reference, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = _args(run_dir, cache_dir, "fsdp-lora")
    held = run_dir / "checkpoints" / f".partial-step-{2 * EVERY:06d}"
    proc = _start(args, tmp_path / "first.log", env={"SFT_TEST_HOLD_BEFORE_COMMIT": str(2 * EVERY)})
    _wait_for((held / "HELD_FOR_TEST").is_file, proc)
    assert (held / "model" / ".metadata").is_file()  # every shard is written; nothing is committed
    for pid in [proc.pid, *_worker_pids(run_dir).values()]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{EVERY:06d}"

    again = run_sft(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"step-{EVERY:06d} (step {EVERY} of {STEPS})" in again.stdout
    assert not held.exists() and not list((run_dir / "checkpoints").glob(".partial-*"))
    assert_same_weights(_last(run_dir), _last(reference("fsdp-lora")))


def test_fsdp_resumes_on_another_world_size(reference, tmp_path, cache_dir):
    ref = reference("fsdp")
    run_dir = tmp_path / "run"
    _restore(ref, run_dir, EVERY)
    proc = run_sft(_args(run_dir, cache_dir, "fsdp", nproc=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same global batch (32 sequences per step, now 2 micro-batches of 16 on one rank): the first step after
    # the checkpoint sees the resharded weights and computes the same loss up to summation order; later
    # steps drift only by rounding, which lr=1e-2 amplifies a little.
    losses, ref_losses = _losses(run_dir), _losses(ref)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[EVERY + 1] == pytest.approx(ref_losses[EVERY + 1], rel=1e-6)
    assert [losses[s] for s in sorted(losses)] == pytest.approx([ref_losses[s] for s in sorted(losses)], rel=1e-2)


def test_a_failing_save_leaves_the_previous_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = run_sft(_args(run_dir, cache_dir, "ddp", f"train.max_steps={EVERY}"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    # Continue it to step 16 with a 1 MiB limit on file size: every shard write fails as on a full disk.
    args = _args(run_dir, cache_dir, "ddp", f"train.max_steps={2 * EVERY}")
    proc = subprocess.run(["bash", "-c", 'ulimit -f 1024 && exec "$@"', "bash", sys.executable, "-m", "launcher", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"saving checkpoint step-{2 * EVERY:06d}" in proc.stderr and "failed on rank 0, 1" in proc.stderr
    assert f"The previous checkpoint (step-{EVERY:06d}) and `latest` are unchanged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before  # nothing partial kept
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{EVERY:06d}"


@pytest.mark.parametrize(
    "config,extra,message",
    [
        ("ddp", ["checkpoint.resume=/no/such/run"], "checkpoint.resume: /no/such/run does not exist"),
        ("ddp", ["model.path=builtin:tiny-qwen2"], "model_type is 'llama' in the checkpoint but 'qwen2'"),
        ("ddp-lora", ["lora.r=8"], "lora.r was 16 there and is 8 now"),
        ("zero3", ["strategy.backend=fsdp"], "strategy.backend was 'deepspeed' there and is 'fsdp' now"),
        ("zero3", ["--nproc", "1", "train.global_batch_size=32"], "written by 2 ranks and this run has 1"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_before_any_worker(config, extra, message, reference, tmp_path, cache_dir):
    resume = [] if any(e.startswith("checkpoint.resume=") for e in extra) else [f"checkpoint.resume={reference(config)}"]
    args = [a for a in _args(tmp_path / "run", cache_dir, config, *resume) if a not in ("--nproc", "2")] + extra
    if "--nproc" not in extra:
        args += ["--nproc", "2"]
    proc = run_sft(args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "logs" / "rank-0.log").exists()  # refused before any worker started


def test_own_run_dir_finished_never_and_extended(tmp_path, cache_dir):
    run_dir, train = tmp_path / "run", tmp_path / "train.jsonl"
    train.write_text((REPO / "recipes/data/quickstart/train.jsonl").read_text())
    args = _args(run_dir, cache_dir, "ddp", f"train.max_steps={EVERY}", "export.on_finish=true", f"data.train_files=[{train}]", nproc=1)
    assert run_sft(args).returncode == 0
    again = run_sft(args)
    assert again.returncode == 0 and "has finished" in again.stdout and "Nothing to do" in again.stdout
    never = run_sft([*args, "checkpoint.resume=never"])
    assert never.returncode == 2 and "checkpoint.resume is never" in never.stderr
    other = run_sft([*args, "train.lr=0.5"])
    assert other.returncode == 2 and "holds a different run (recipe differs in: train.lr)" in other.stderr
    longer = run_sft([*args, f"train.max_steps={EVERY + 2}"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "changed since: train.max_steps" in longer.stdout
    assert json.loads((run_dir / "final" / "export.json").read_text())["step"] == EVERY + 2  # final/ follows the run

    # The training file edited between attempts, as `cp -p` / `rsync -a` would leave it: same size and mtime.
    state = json.loads((run_dir / "checkpoints" / f"step-{EVERY + 2:06d}" / "trainer_state.json").read_text())
    st = train.stat()
    train.write_text(train.read_text().replace('"content": "y o d a"', '"content": "y o d e"', 1))  # the first reply
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
    edited = run_sft([*args, f"train.max_steps={EVERY + 4}"])
    assert edited.returncode == 2 and f"data file {train} is not the one it trained on" in edited.stderr, edited.stderr[-2000:]
    assert state["data_files"][str(train)] in edited.stderr  # the digest the checkpoint recorded
