"""Preemption: SIGTERM or SIGUSR1 asks the run to save a checkpoint and stop; it may be resumed.

A worker's signal handler only records the request. The ranks agree on it at the next step
boundary (one all-reduce in the loop), save together, and exit with EXIT_RESUMABLE. The
request is watched by a thread reading the interpreter's wakeup fd, so the grace deadline and a
second signal act at once even while the main thread is inside a long C++ call (a backward, a
collective): then the process exits without finishing its checkpoint, which leaves `latest`
on the previous complete one.

A signal repeated within DUPLICATE_WINDOW_S of the first counts once: a scheduler that signals
every process of a job reaches the workers directly and again through `sft run`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". A checkpoint at the
# step where the run stopped is complete; running the same command again continues from it.
EXIT_RESUMABLE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 2.0


@dataclass
class StopRequest:
    grace_s: float
    signal_name: Optional[str] = None
    at: float = 0.0
    sockets: tuple = ()  # the wakeup fd's socket pair, kept open as long as the request lives

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def _exit_now(signum: int, why: str) -> None:
    print(f"stopping now ({why}) without finishing a checkpoint; `latest` still names the last complete one", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _watch(sock: socket.socket, request: StopRequest) -> None:
    while True:
        data = sock.recv(64)
        if not data:
            return
        for signum in data:
            if signum not in STOP_SIGNALS:
                continue
            now = time.monotonic()
            if not request.requested:
                request.at = now
                request.signal_name = signal.Signals(signum).name
                print(f"{request.signal_name} received: saving a checkpoint at the end of this step (grace {request.grace_s:g} s)", file=sys.stderr, flush=True)
                timer = threading.Timer(request.grace_s, _exit_now, args=(signum, f"checkpoint.signal_grace_s={request.grace_s:g} passed"))
                timer.daemon = True
                timer.start()
            elif now - request.at >= DUPLICATE_WINDOW_S:
                _exit_now(signum, f"second {signal.Signals(signum).name}")


def install(grace_s: float) -> StopRequest:
    """Start watching for stop signals; call from the main thread before training."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    request = StopRequest(grace_s=grace_s, sockets=(reader, writer))
    for s in STOP_SIGNALS:
        signal.signal(s, lambda *_: None)  # a Python-level handler is what makes the wakeup fd fire
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(reader, request), daemon=True, name="stop-signals").start()
    return request


class Preempted(Exception):
    """Raised by the loop on every rank after the stop checkpoint is saved."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step = step
        self.signal_name = signal_name
