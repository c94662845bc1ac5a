"""Each worker's sign of life, and the launcher's watch over the workers on its node.

A worker rewrites the time of logs/rank-R.alive every second from a daemon thread. A rank that
stops running (SIGSTOP, a frozen VM, a debugger holding it) stops doing so: its peers would wait
in their next collective until launch.collective_timeout_s, and the elastic agent would then wait
its shutdown grace on a process that cannot act on SIGTERM. The launcher's watch kills a local
rank that has been silent for longer than the collective timeout and says which rank it was, so
the run ends within about that timeout with a message naming the rank that hung.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

BEAT_S = 1.0
_STATES = {"T": "stopped (SIGSTOP, or a debugger)", "t": "stopped by a debugger", "D": "waiting on disk or network I/O",
           "R": "running", "S": "sleeping"}


def _file(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / f"rank-{rank}.alive"


def _started(pid: int) -> Optional[str]:
    """When the process started (clock ticks since boot, /proc/PID/stat field 22): with the pid, names one
    process even after the pid is reused. None if it is gone or /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


_stopped = threading.Event()


def start(log_dir: Path, rank: int) -> None:
    """In a worker: beat until `stop` (or the process's end: the thread is a daemon)."""
    path = _file(log_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{socket.gethostname()} {os.getpid()} {_started(os.getpid())}\n")
    except OSError:
        return  # unwatched is better than not training; the collective timeout still applies

    def beat():
        while not _stopped.wait(BEAT_S):
            now = time.time()  # this host's clock, also on a shared file system (the watch compares with it)
            with contextlib.suppress(Exception):  # a beat that dies would read as a hang
                os.utime(path, (now, now))

    threading.Thread(target=beat, name="sft-heartbeat", daemon=True).start()


def stop(log_dir: Path, rank: int) -> None:
    """In a worker whose process group is gone: no peer can wait on it any more, so a long export
    that keeps the interpreter busy must not read as a hang. If the file cannot be removed, it beats on."""
    try:
        _file(log_dir, rank).unlink(missing_ok=True)
    except OSError:
        return
    _stopped.set()


@dataclass
class Hung:
    rank: int
    pid: int
    silent_s: float
    state: str

    def describe(self, timeout_s: int) -> str:
        state = _STATES.get(self.state, f"in state {self.state}")
        return (f"rank {self.rank} stopped responding: no sign of life for {self.silent_s:.0f} s, longer than "
                f"launch.collective_timeout_s={timeout_s}, and its process was {state}; it was killed so that the run "
                "ends instead of waiting. Look at what stopped it (a debugger, SIGSTOP, the node); a rerun resumes "
                "from the last checkpoint.")


class Watch:
    """In the launcher: a thread that kills this host's workers once silent for longer than `timeout_s`.
    A worker is judged only after its file's time has been seen to move (a file system that ignores
    utime must not make every rank look hung), and only while its pid is still the process that wrote it."""

    def __init__(self, log_dir: Path, timeout_s: int):
        self.log_dir, self.timeout_s = Path(log_dir), timeout_s
        self.hung: Dict[int, Hung] = {}  # by pid: a restarted rank is a new process, watched afresh
        self._host = socket.gethostname()
        self._first: Dict[int, float] = {}  # pid -> its file's first time seen
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sft-watch", daemon=True)
        for rank, pid, started in self._local():  # a previous run's files, from this host
            if _started(pid) != started:
                _file(self.log_dir, rank).unlink(missing_ok=True)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _local(self):
        for path in self.log_dir.glob("rank-*.alive"):
            with contextlib.suppress(OSError, ValueError):
                host, pid, started = path.read_text().split()
                if host == self._host:
                    yield int(path.name.split("-")[1].split(".")[0]), int(pid), started

    def _check(self, rank: int, pid: int, started: str, since: float) -> None:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rpartition(")")[2].split()[0]
        if started == "None" or _started(pid) != started or state == "Z" or pid in self.hung:
            return  # gone, reused, exiting, or already handled
        mtime = _file(self.log_dir, rank).stat().st_mtime
        first = self._first.setdefault(pid, mtime)
        silent = time.time() - max(since, mtime)
        if mtime > first and silent > self.timeout_s:
            self.hung[pid] = Hung(rank, pid, silent, state)
            os.kill(pid, signal.SIGKILL)

    def _run(self) -> None:
        since = last = time.time()  # silence counts from `since` at the earliest
        while not self._done.wait(BEAT_S):
            if time.time() - last > 5 * BEAT_S:
                since = time.time()  # this process was not running either (Ctrl-Z, a suspended machine)
            for rank, pid, started in list(self._local()):
                with contextlib.suppress(OSError, IndexError):
                    self._check(rank, pid, started, since)
            last = time.time()  # after the scan: a slow file system does not read as a suspended watch
