"""`sft run --nnodes 2`: two launchers (as on two hosts; here two processes on loopback) meet at
node 0's c10d rendezvous and train one run together, with the numbers of a one-node 2-rank run."""

import json
import os
import socket
import subprocess
import sys

from conftest import REPO, run_sft

QUICKSTART = "recipes/quickstart.yaml"


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_nodes_rendezvous_and_train_like_one_node_with_two_ranks(tmp_path, cache_dir):
    common = [QUICKSTART, f"data.cache_dir={cache_dir}", "train.max_steps=6", "train.eval_generate=0", "logging.every_steps=1"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "two-nodes"
    nodes = [["run", *common, f"output_dir={run_dir}", "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
              "--rdzv-endpoint", f"127.0.0.1:{port}"] for rank in (1, 0)]  # node 1 first: it waits for node 0
    # The two "nodes" share this host's cores, as the one-node run's 2 ranks do: one thread per rank in
    # both, so the matmuls sum in the same order and the losses can be compared exactly.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for args in nodes]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "world size 2 (1 per node x 2 nodes)" in outputs[1]
    assert {p.name for p in (run_dir / "logs").iterdir()} >= {"rank-0.log", "rank-1.log"}
    assert (run_dir / "final" / "model.safetensors").is_file()

    one_node = tmp_path / "one-node"
    single = run_sft(["run", *common, f"output_dir={one_node}", "--nproc", "2"])
    assert single.returncode == 0, single.stderr[-3000:]
    assert _losses(run_dir) == _losses(one_node) and len(_losses(run_dir)) == 6


def test_multinode_needs_an_endpoint(tmp_path, cache_dir):
    proc = run_sft(["run", QUICKSTART, f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'run'}", "--nnodes", "2"])
    assert proc.returncode == 2 and "needs launch.rdzv_endpoint" in proc.stderr and not (tmp_path / "run" / "logs" / "rank-0.log").exists()
