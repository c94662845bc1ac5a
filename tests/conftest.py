import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test files run at once (pyproject's -n 2, one file per worker, in order): one thread per
    # process keeps a worker's runs from spinning OpenMP threads on the other's cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (built-in models, tokenized data) shared by the whole test session."""
    return tmp_path_factory.mktemp("sft-cache")


def run_sft(args, cwd=REPO, env=None, timeout=600):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
