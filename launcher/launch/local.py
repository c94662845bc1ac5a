"""Start the workers on this machine with torch's elastic agent (what torchrun uses).

One process per rank, `python -m launcher.worker RECIPE [overrides]`, c10d rendezvous,
restarts by the agent. Each rank's stdout and stderr go to output_dir/logs/; rank 0's
are also shown on the console. A single process without restarts runs in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import LogsDest, LogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from launcher import checkpoint, heartbeat
from launcher.errors import UserError
from launcher.preemption import EXIT_RESUMABLE
from launcher.worker import LAUNCHED_ENV


class RankLogs(LogsSpecs):
    """logs/rank-R.log (stderr: logging, progress, tracebacks) and logs/rank-R.stdout, per global rank."""

    def __init__(self, log_dir: Path):
        super().__init__(log_dir=str(log_dir), redirects=Std.ALL, tee=Std.NONE)
        self.log_dir = Path(log_dir)

    @property
    def root_log_dir(self) -> str:
        return str(self.log_dir)

    def reify(self, envs: dict) -> LogsDest:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        dest = LogsDest()
        for local_rank, env in envs.items():
            restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
            stem = self.log_dir / (f"rank-{env['RANK']}" + (f".restart-{restart}" if restart else ""))
            dest.stdouts[local_rank] = f"{stem}.stdout"
            dest.stderrs[local_rank] = f"{stem}.log"
            dest.error_files[local_rank] = f"{stem}.error.json"
            env["TORCHELASTIC_ERROR_FILE"] = dest.error_files[local_rank]
            if env["RANK"] == "0":
                dest.tee_stdouts[local_rank] = dest.stdouts[local_rank]
                dest.tee_stderrs[local_rank] = dest.stderrs[local_rank]
        return dest


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


def _first_failure(failures: dict) -> tuple:
    """(global rank, failure) of the rank that failed first. The agent's timestamps are whole seconds
    and it SIGTERMs the survivors once one rank dies, so: a rank the agent terminated comes last, then
    by when each rank last wrote (its error file, else its log): a peer's "connection closed" follows
    the crash that caused it."""

    def when(f) -> float:
        for path in (f.error_file, f.error_file.removesuffix(".error.json") + ".log"):
            with contextlib.suppress(OSError, TypeError):
                return os.stat(path).st_mtime
        return float(f.timestamp)

    return min(failures.items(), key=lambda item: (item[1].exitcode == -signal.SIGTERM, when(item[1]), item[0]))


def _failure_report(failures: dict, watch: heartbeat.Watch) -> int:
    hung = [watch.hung[f.pid] for f in failures.values() if f.pid in watch.hung]
    if hung:  # the others failed because this one stopped answering
        hung = hung[0]
        log = Path(watch.log_dir) / f"rank-{hung.rank}.log"
        print(f"error: {hung.describe(watch.timeout_s)} Last lines of {log}:\n{_tail(str(log))}", file=sys.stderr)
        return 1
    codes = {f.exitcode for f in failures.values()}
    if codes == {EXIT_RESUMABLE}:
        return EXIT_RESUMABLE  # a stop signal sent to the workers themselves; they saved and said so
    rank, failure = _first_failure(failures)
    log = Path(str(failure.error_file).removesuffix(".error.json") + ".log")
    if failure.exitcode == 2:
        if rank != 0:  # only rank 0's output is on the console
            print("\n".join(line for line in _tail(str(log), 40).splitlines() if line.startswith("error:")) or _tail(str(log)), file=sys.stderr)
        return 2
    others = sorted(r for r in failures if r != rank)
    then = f" (then rank(s) {', '.join(map(str, others))} stopped too)" if others else ""
    signal_text = f" (signal {failure.signal_name()})" if failure.exitcode < 0 else ""
    print(f"error: rank {rank} failed first: it exited with code {failure.exitcode}{signal_text}{then}. Last lines of {log}:\n{_tail(str(log))}",
          file=sys.stderr)
    return 1


def _stop_report(recipe, sig: signal.Signals, step_before: int) -> int:
    """After a stop signal: EXIT_RESUMABLE if the workers saved a checkpoint for it, 0 if they had
    finished anyway, 128 + signal otherwise."""
    from launcher.resume import finished

    run_dir = Path(recipe.output_dir)
    ckpt = checkpoint.latest(run_dir)
    state = checkpoint.read_state(ckpt) if ckpt else {}
    if ckpt and finished(recipe, ckpt, state["total_steps"]):
        print(f"{sig.name} arrived after the last step; the run finished ({ckpt.name}).", file=sys.stderr, flush=True)
        return 0
    if sig != signal.SIGINT and state.get("stopped_by") and state["step"] > step_before:
        print(f"stopped by {sig.name} at step {state['step']} of {state['total_steps']}: checkpoint {ckpt} is complete. "
              f"Run the same command again to resume (exit code {EXIT_RESUMABLE}).", file=sys.stderr, flush=True)
        return EXIT_RESUMABLE
    where = f"`latest` is {ckpt.name}, from which a rerun resumes" if ckpt else "there is no checkpoint yet"
    print(f"stopped by {sig.name} before a checkpoint for it was complete; {where}.", file=sys.stderr, flush=True)
    return 128 + sig


def launch(recipe_path: str, overrides: list, recipe) -> int:
    """Run the workers to completion; the exit code of the run (0 ok, 2 user error, 75 stopped by a
    signal with a checkpoint to resume from, 1 failure)."""
    worker_args = [recipe_path, *overrides]
    os.environ[LAUNCHED_ENV] = "1"
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.update({k: str(v) for k, v in recipe.launch.env.items()})
    la = recipe.launch
    if la.nnodes > 1:
        host, _, port = (la.rdzv_endpoint or "").rpartition(":")
        if not host or not port.isdigit():
            raise UserError(
                f"launch.nnodes={la.nnodes} needs launch.rdzv_endpoint (--rdzv-endpoint) as HOST:PORT of node 0, the same "
                f"on every node; got {la.rdzv_endpoint!r}. `sft submit` fills it in on Slurm."
            )
    nproc = la.nproc_per_node
    if nproc == 1 and la.nnodes == 1 and la.max_restarts == 0:
        from launcher.worker import main as worker_main

        return worker_main(worker_args)

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    if "OMP_NUM_THREADS" not in os.environ:
        # Each worker's torch would otherwise start one thread per core: N ranks on a node run N x cores
        # threads, and oversubscribed OpenMP threads spin (a 2-rank CPU run measured 6x slower).
        # torchrun sets 1; this gives each rank its share of the cores this process may use.
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    run_dir = Path(recipe.output_dir)
    log_dir = run_dir / "logs"
    # The agent forwards these to the workers (preemption.py), then waits shutdown_timeout for them to exit.
    # Older torch reads both from the environment; newer torch takes them as LaunchConfig fields.
    settings = {"signals_to_handle": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "shutdown_timeout": int(recipe.checkpoint.signal_grace_s) + 30}
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = settings["signals_to_handle"]
    os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(settings["shutdown_timeout"])
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    extra = {k: v for k, v in settings.items() if k in fields}
    before = checkpoint.latest(run_dir)
    step_before = checkpoint.read_state(before)["step"] if before else -1
    if la.nnodes > 1:
        # Every node's agent must name the same rendezvous: derive its id from what they share.
        run_id = "sft-" + hashlib.sha1(f"{la.rdzv_endpoint} {run_dir.resolve()}".encode()).hexdigest()[:12]
        endpoint, rdzv = la.rdzv_endpoint, {"is_host": la.node_rank == 0}
    else:
        run_id, endpoint, rdzv = str(uuid.uuid4()), "localhost:0", {}  # as torchrun --standalone: a free port here
    config = LaunchConfig(
        min_nodes=la.nnodes,
        max_nodes=la.nnodes,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv,
        max_restarts=la.max_restarts,
        logs_specs=RankLogs(log_dir),
        log_line_prefix_template="",
        start_method="spawn",
        **extra,
    )
    with heartbeat.Watch(log_dir, la.collective_timeout_s) as watch:
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "launcher.worker", *worker_args)
        except SignalException as e:
            return _stop_report(recipe, e.sigval, step_before)
        except ChildFailedError as e:
            return _failure_report(e.failures, watch)
    return 0
