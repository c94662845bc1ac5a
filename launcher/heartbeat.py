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


_stopped = threading.Event()


def start(log_dir: Path, rank: int) -> None:
    """In a worker: beat until `stop` (or the process's end: the thread is a daemon)."""
    path = _file(log_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{socket.gethostname()} {os.getpid()}\n")
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
    that keeps the interpreter busy must not read as a hang."""
    _stopped.set()
    with contextlib.suppress(OSError):
        _file(log_dir, rank).unlink()


def _state(pid: int) -> Optional[str]:
    """The process's one-letter state (R, S, D, T, Z, ...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if b"launcher.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None  # the pid was reused by something else
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


@dataclass
class Hung:
    rank: int
    silent_s: float
    state: str

    def describe(self, timeout_s: int) -> str:
        state = _STATES.get(self.state, f"in state {self.state}")
        return (f"rank {self.rank} stopped responding: no sign of life for {self.silent_s:.0f} s, longer than "
                f"launch.collective_timeout_s={timeout_s}, and its process was {state}; it was killed so that the run "
                "ends instead of waiting. Look at what stopped it (a debugger, SIGSTOP, the node); a rerun resumes "
                "from the last checkpoint.")


class Watch:
    """In the launcher: a thread that kills this host's workers once silent for longer than `timeout_s`."""

    def __init__(self, log_dir: Path, timeout_s: int):
        self.log_dir, self.timeout_s = Path(log_dir), timeout_s
        self.hung: Dict[int, Hung] = {}
        self._host = socket.gethostname()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sft-watch", daemon=True)
        for rank, _ in self._local():  # a previous run's files, from this host
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
                host, pid = path.read_text().split()
                if host == self._host:
                    yield int(path.name.split("-")[1].split(".")[0]), int(pid)

    def _run(self) -> None:
        since = last = time.time()  # silence counts from `since` at the earliest
        while not self._done.wait(BEAT_S):
            if time.time() - last > 5 * BEAT_S:
                since = time.time()  # this process was not running either (Ctrl-Z, a suspended machine)
            last = time.time()
            for rank, pid in list(self._local()):
                state = _state(pid)
                if state is None or state == "Z" or rank in self.hung:
                    continue
                with contextlib.suppress(OSError):
                    silent = time.time() - max(since, _file(self.log_dir, rank).stat().st_mtime)
                    if silent > self.timeout_s:
                        self.hung[rank] = Hung(rank, silent, state)
                        os.kill(pid, signal.SIGKILL)
