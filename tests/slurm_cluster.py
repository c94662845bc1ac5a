"""A real two-node Slurm cluster on loopback for the tests (DESIGN.md, section 4).

Debian's slurmctld, slurmd, slurm-client and munge are installed if missing (root, seconds), one
slurmctld and two slurmd (n1, n2, both 127.0.0.1, own ports) start with a config in a temporary
directory, and SLURM_CONF points the clients (sbatch, scontrol, squeue) at it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
# Seconds a job credential stays valid; Slurm's default (120) would hold every requeued job that long.
CRED_EXPIRE_S = 10
CONF = """ClusterName=sfttest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=cred_expire={cred_expire}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
NodeName=n1 NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"the Slurm tests need {' '.join(PACKAGES)} (Debian packages) or root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)  # a machine with no package lists yet
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], check=True, env=env, capture_output=True)


def _start_munge() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)


def _resolve_node_names() -> None:
    hosts = Path("/etc/hosts")
    if not any(set(line.split()[1:]) >= {"n1", "n2"} for line in hosts.read_text().splitlines() if line.strip()):
        with open(hosts, "a") as f:
            f.write("127.0.0.1 n1 n2\n")


def start(root: Path) -> dict:
    """Start the cluster; returns the environment clients need (SLURM_CONF)."""
    _install()
    _start_munge()
    _resolve_node_names()
    for d in ("state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(root=root, ctld_port=16817, n1_port=17101, n2_port=17102, cred_expire=CRED_EXPIRE_S))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, env=env)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=env).stdout.split()
        if out[:2] == ["idle", "2"]:
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    raise RuntimeError(f"the test Slurm cluster did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")


def stop(env: dict) -> None:
    full = {**os.environ, **env}
    subprocess.run(["scancel", "--full", "--user", "root"], env=full, capture_output=True)
    subprocess.run(["scontrol", "shutdown"], env=full, capture_output=True)


def wait_until_done(job: str, env: dict, timeout: float = 900) -> str:
    """Wait until `job` has left the queue; returns its final state."""
    full = {**os.environ, **env}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=full).stdout
        state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def release_requeued(job: str, env: dict, timeout: float = 600) -> None:
    """Slurm holds a requeued job back for a minute or two (BeginTime); start it once the previous
    attempt's job credential has expired (AuthInfo=cred_expire=10), as an admin can. Sooner, slurmd
    refuses the new launch ("Job credential revoked") and the job fails."""
    full = {**os.environ, **env}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=full).stdout
        if "Restarts=1" in out and "JobState=PENDING" in out:
            time.sleep(CRED_EXPIRE_S + 5)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=full, capture_output=True)
            return
        if "JobState=COMPLETED" in out or "JobState=FAILED" in out:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {timeout} s")
