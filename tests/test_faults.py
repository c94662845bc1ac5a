"""Faults with real processes: the run reports what failed, and nothing of a user's is lost."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

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


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_a_deepspeed_save_failing_on_one_rank_fails_every_rank_at_once(stage, tmp_path, cache_dir):
    # Rank 1's writes inside DeepSpeed's save_checkpoint hit a real EFBIG (tests/helpers/small_files_rank1);
    # rank 0's succeed. DeepSpeed barriers between its writes: without holding the error rank 0 would wait
    # there for launch.collective_timeout_s (here 3600 s, past this test's 900 s timeout).
    helper = REPO / "tests" / "helpers" / "small_files_rank1"
    env = {"PYTHONPATH": os.pathsep.join([str(helper), str(REPO), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    args = ["run", QUICKSTART, "--nproc", "2", *_short(run_dir, cache_dir, "train.eval_every=0", "checkpoint.every_steps=1",
                                                        "strategy.backend=deepspeed", f"strategy.zero_stage={stage}",
                                                        "launch.collective_timeout_s=3600")]
    proc = run_sft(args, env=env, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "saving checkpoint step-000001" in proc.stderr and "failed on rank 1 (rank 1: RuntimeError" in proc.stderr, proc.stderr[-3000:]
    assert "The previous checkpoint (none) and `latest` are unchanged" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((run_dir / "checkpoints").iterdir())  # nothing committed, nothing partial left


def test_a_rank_that_hangs_fails_the_run_naming_it(tmp_path, cache_dir):
    # SIGSTOP rank 1 mid-training: rank 0 waits in its next all-reduce. The launcher's watch kills the
    # silent rank after launch.collective_timeout_s (30 s) and names it; without it the agent would then
    # wait its shutdown grace (signal_grace_s + 30 = 630 s, past this test's timeout) on a stopped process.
    run_dir = tmp_path / "run"
    args = ["run", QUICKSTART, "--nproc", "2", *_short(run_dir, cache_dir, "train.max_steps=100000", "train.eval_every=0",
                                                        "launch.collective_timeout_s=30", "checkpoint.signal_grace_s=600")]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    alive = {rank: run_dir / "logs" / f"rank-{rank}.alive" for rank in (0, 1)}
    pids = {}
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: proc.poll() is not None or (all(a.exists() for a in alive.values()) and metrics.exists()
                                                      and '"step"' in metrics.read_text()), what="training to start")
        assert proc.poll() is None, proc.communicate()
        pids = {rank: int(a.read_text().split()[1]) for rank, a in alive.items()}
        os.kill(pids[1], signal.SIGSTOP)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        for pid in pids.values():  # the agent starts its workers in their own sessions: a failed test must not leave them
            with contextlib.suppress(OSError):
                if b"launcher.worker" in open(f"/proc/{pid}/cmdline", "rb").read():
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "error: rank 1 stopped responding" in err and "launch.collective_timeout_s=30" in err, err[-3000:]
    assert "stopped (SIGSTOP, or a debugger)" in err


def _wait_for(predicate, timeout=300, what="a condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def held_run(tmp_path_factory, cache_dir):
    """One 1-rank run of 2 steps, saving each step. While it holds at step 1 (shards written, not committed),
    a second `sft run` of the same output_dir is tried. Returns (run_dir, second run's exit code and stderr,
    files before and after the second run)."""
    from launcher.cli import main

    run_dir = tmp_path_factory.mktemp("held") / "run"
    args = ["run", QUICKSTART, *_short(run_dir, cache_dir, "train.eval_every=0", "checkpoint.every_steps=1")]
    first = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, env={**os.environ, "SFT_TEST_HOLD_BEFORE_COMMIT": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / ".partial-step-000001" / "HELD_FOR_TEST").exists() or first.poll() is not None,
                  what="the first run to hold before its commit")
        assert first.poll() is None, first.communicate()
        before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            second = main(args[:-1] + [args[-1], "--overwrite"])  # even --overwrite must not touch a run in progress
        after = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    return run_dir, second, err.getvalue(), before, after


def test_a_second_run_of_the_same_output_dir_is_refused(held_run):
    run_dir, code, err, before, after = held_run
    assert code == 2 and f"output_dir {run_dir} is in use by another `sft run`" in err, err
    assert before == after  # the first run's files, its partial checkpoint included, are as they were
    assert (run_dir / "checkpoints" / "step-000001" / "COMPLETE").is_file() and (run_dir / "checkpoints" / "step-000002" / "COMPLETE").is_file()


def test_an_old_checkpoint_that_cannot_be_removed_does_not_stop_the_run(tmp_path, cache_dir):
    # keep_last=1: committing step 2 rotates step 1 out. While the run holds before that commit, a non-empty
    # directory takes the name step 1 is renamed to on its way out, so removing it fails (ENOTEMPTY, also
    # for root; on NFS a file still open gives EBUSY the same way). The new checkpoint is committed anyway.
    run_dir = tmp_path / "run"
    args = ["run", QUICKSTART, *_short(run_dir, cache_dir, "train.eval_every=0", "checkpoint.every_steps=1", "checkpoint.keep_last=1")]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, env={**os.environ, "SFT_TEST_HOLD_BEFORE_COMMIT": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / ".partial-step-000002" / "HELD_FOR_TEST").exists() or proc.poll() is not None,
                  what="the run to hold before its second commit")
        assert proc.poll() is None, proc.communicate()
        blocker = run_dir / "checkpoints" / ".partial-removing-step-000001"
        blocker.mkdir()
        (blocker / "still-open").write_text("")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "warning: checkpoint step-000002 is saved, but removing the older step-000001 failed" in err, err[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (run_dir / "checkpoints" / "step-000001" / "COMPLETE").is_file()  # kept, still usable


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".o-")]


def test_export_on_a_full_disk_leaves_out_absent(held_run, tmp_path):
    import resource

    run_dir = held_run[0]
    out = tmp_path / "o"

    def small_files():  # a real write failure (EFBIG; Python ignores SIGXFSZ) past 64 KiB: the disk is "full"
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([sys.executable, "-m", "launcher", "export", str(run_dir), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=small_files, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "writing the export failed" in proc.stderr and f"{out} was not touched" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not _leftovers(tmp_path)


def test_export_stopped_by_sigterm_leaves_out_as_it_was(held_run, tmp_path):
    run_dir = held_run[0]
    out = tmp_path / "o"
    out.mkdir()  # an empty --out given by the user stays, empty
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "export", str(run_dir), "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _leftovers(tmp_path) or proc.poll() is not None, what="the export's temporary directory")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    assert out.is_dir() and not any(out.iterdir()) and not _leftovers(tmp_path), err[-2000:]


def _damaged_copy(run_dir, dest, how):
    import shutil

    shutil.copytree(run_dir, dest)
    shard = max((p for p in (dest / "checkpoints" / "step-000002" / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    if how == "truncate":  # a copy cut short
        shard.write_bytes(data[: len(data) // 2])
    else:  # bit rot: same size, one byte flipped
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(data)
    return shard


def test_export_refuses_a_truncated_shard_and_offers_the_previous_checkpoint(held_run, tmp_path):
    from launcher.errors import UserError
    from launcher.export import export

    run = tmp_path / "run"
    shard = _damaged_copy(held_run[0], run, "truncate")
    name = shard.relative_to(run / "checkpoints" / "step-000002")
    with pytest.raises(UserError, match=rf"step-000002 is damaged: {name} is \d+ bytes, \d+ when saved.*previous checkpoint .*step-000001 is intact"):
        export(run, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_resume_sets_a_corrupted_checkpoint_aside_and_continues_from_the_previous(held_run, tmp_path, cache_dir):
    run = tmp_path / "run"
    shard = _damaged_copy(held_run[0], run, "flip")
    name = shard.relative_to(run / "checkpoints" / "step-000002")
    proc = run_sft(["run", QUICKSTART, *_short(run, cache_dir, "train.eval_every=0", "checkpoint.every_steps=1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{name} has changed since it was saved" in proc.stdout and "damaged-step-000002" in proc.stdout
    assert "resuming from" in proc.stdout and "step-000001 (step 1 of 2)" in proc.stdout
    assert (run / "checkpoints" / "damaged-step-000002").is_dir()  # kept for the user, not deleted
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"  # trained again
