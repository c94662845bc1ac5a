"""The stop-signal watcher in a real process: a first signal only asks; a second one (or the grace
deadline) ends the process at once, even while its main thread is busy."""

import subprocess
import sys
import time

from conftest import REPO

PROGRAM = """
import os, signal, sys, time
from launcher import preemption
stop = preemption.install(grace_s=float(sys.argv[1]))
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.5)
print("requested", stop.requested, stop.signal_name, flush=True)
if sys.argv[2] == "second":
    time.sleep(preemption.DUPLICATE_WINDOW_S)
    os.kill(os.getpid(), signal.SIGTERM)
elif sys.argv[2] == "duplicate":
    os.kill(os.getpid(), signal.SIGUSR1)  # within the window: the same request, delivered twice
    time.sleep(1.0)
    print("still running", flush=True)
    sys.exit(0)
sum(i * i for i in range(10**9))  # busy in the main thread: the watcher thread still acts
print("not reached", flush=True)
"""


def _run(grace: float, mode: str):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(grace), mode], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def test_grace_deadline_stops_a_busy_process():
    proc, _ = _run(2.0, "busy")
    assert "requested True SIGUSR1" in proc.stdout and "not reached" not in proc.stdout
    assert proc.returncode == 128 + 10 and "checkpoint.signal_grace_s=2 passed" in proc.stderr


def test_second_signal_stops_at_once_and_a_duplicate_does_not():
    proc, _ = _run(600.0, "second")
    assert proc.returncode == 128 + 15 and "second SIGTERM" in proc.stderr and "not reached" not in proc.stdout
    proc, _ = _run(600.0, "duplicate")
    assert proc.returncode == 0 and "still running" in proc.stdout, proc.stderr
