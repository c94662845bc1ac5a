"""benchmarks/gpu.sh cannot rot between GPU sessions: its dry run runs here on CPU (a scaled-down
model through the same throughput code, the GPU-marked tests collected and skipped)."""

import json
import os
import subprocess
import sys

import torch

from conftest import REPO


def test_gpu_script_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    figures = ("tokens_per_s", "mfu", "peak_mem_gib", "step_s")
    assert sorted((r["config"], r["figure"]) for r in rows) == sorted((c, f) for c in ("full", "lora") for f in figures)
    assert all(r["dry_run"] and r["device"] == "cpu" for r in rows)
    assert all(r["value"] > 0 for r in rows if r["figure"] in ("tokens_per_s", "step_s"))
    lora = next(r for r in rows if r["config"] == "lora")
    assert 0 < lora["trainable"] < lora["params"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| full | cpu | sdpa |" in summary and "| lora | cpu | sdpa |" in summary and "Failed parts: none" in summary
    assert "skipped" in (tmp_path / "pytest.log").read_text()  # tests/test_gpu.py was collected, and skipped without CUDA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.txt", "junit.xml", "pytest.log", "results.jsonl", "run.log", "summary.md"]


def test_throughput_model_has_qwen25_05b_shape():
    """The GPU figures are for the real 0.5B shape: 494,032,768 parameters, as Qwen2.5-0.5B has."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_throughput import QWEN25_05B

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
