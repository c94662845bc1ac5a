"""On CUDA: every engine trains a few bf16 steps, LoRA on fsdp and ZeRO-3, a checkpoint resumes,
an export serves the trained logits. Skipped without a GPU; benchmarks/gpu.sh runs `pytest -m gpu`
on a lent GPU machine (2 ranks where it has 2 GPUs)."""

import json

import pytest
import torch

from conftest import run_sft

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUICKSTART = "recipes/quickstart.yaml"
NPROC = 2 if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else 1
STEPS = 6
CONFIGS = {
    "fsdp": ["strategy.backend=fsdp"],
    "fsdp-lora": ["strategy.backend=fsdp", "lora.enabled=true"],
    "zero3": ["strategy.backend=deepspeed", "strategy.zero_stage=3"],
    "zero3-lora": ["strategy.backend=deepspeed", "strategy.zero_stage=3", "lora.enabled=true"],
}


def _args(run_dir, cache_dir, *extra):
    # model.dtype auto: bfloat16 on CUDA. global batch 32 on any number of ranks, so losses compare.
    return ["run", QUICKSTART, "--nproc", str(NPROC), f"output_dir={run_dir}", f"data.cache_dir={cache_dir}",
            f"train.max_steps={STEPS}", "train.gradient_accumulation_steps=null", "train.global_batch_size=32",
            "train.lr=1e-3", "train.warmup_steps=0", "train.eval_at_start=false", "train.eval_generate=0",
            "logging.every_steps=1", "export.on_finish=false", *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_dir):
    """ddp in bf16: checkpoints every 3 steps, generation in the final eval, an export at the end."""
    run_dir = tmp_path_factory.mktemp("gpu-ddp") / "run"
    proc = run_sft(_args(run_dir, cache_dir, "strategy.backend=ddp", "checkpoint.every_steps=3", "train.eval_generate=4",
                         "export.on_finish=true"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_process_group_takes_cpu_and_cuda_tensors():
    """The group the engines create on CUDA all-reduces the loop's CPU tensors and NCCL's CUDA ones."""
    import torch.distributed as torch_dist

    from launcher.dist import Dist
    from launcher.engines.fsdp import _ensure_process_group

    assert not torch_dist.is_initialized()
    _ensure_process_group(Dist(device=torch.device("cuda", 0)))
    try:
        assert torch_dist.get_backend_config() == "cpu:gloo,cuda:nccl"
        cpu, gpu = torch.ones(2), torch.ones(2, device="cuda")
        torch_dist.all_reduce(cpu)
        torch_dist.all_reduce(gpu)
        assert cpu.tolist() == gpu.tolist() == [1.0, 1.0]
    finally:
        torch_dist.destroy_process_group()


def test_ddp_trains_in_bf16_with_metrics(ddp_run):
    rows = [r for r in _metrics(ddp_run) if "loss" in r]
    assert len(rows) == STEPS and rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["peak_mem_gib"] > 0 and 0 <= r["mfu"] < 1 for r in rows)  # logged on CUDA only (a tiny model's MFU rounds to ~0)
    state = json.loads((ddp_run / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())
    assert state["train_dtype"] == "bfloat16" and state["world_size"] == NPROC
    assert any("eval_exact_match" in r for r in _metrics(ddp_run))  # generate ran under autocast


def test_export_logits_match_on_cuda(ddp_run):
    from transformers import AutoModelForCausalLM

    report = json.loads((ddp_run / "final" / "export.json").read_text())
    assert report["dtype"] == "bfloat16" and report["max_abs_logit_diff"] <= report["tolerance"]
    prompts = json.loads((ddp_run / "checkpoints" / f"step-{STEPS:06d}" / "verify_prompts.json").read_text())
    ids = torch.tensor([prompts[0]])
    on_cpu = AutoModelForCausalLM.from_pretrained(ddp_run / "final", dtype=torch.float32)(ids).logits
    on_gpu = AutoModelForCausalLM.from_pretrained(ddp_run / "final", dtype=torch.bfloat16).cuda()(ids.cuda()).logits
    assert (on_gpu.float().cpu() - on_cpu).abs().max().item() < 0.1 * on_cpu.abs().max().item()


def test_resume_on_cuda_continues_the_run(ddp_run, tmp_path, cache_dir):
    """From the step-3 checkpoint (weights, AdamW state, RNG of this rank's device) to the same losses."""
    start = ddp_run / "checkpoints" / "step-000003"
    run_dir = tmp_path / "run"
    proc = run_sft(_args(run_dir, cache_dir, "strategy.backend=ddp", f"checkpoint.resume={start}"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses, reference = _losses(run_dir), _losses(ddp_run)
    assert sorted(losses) == [4, 5, 6]
    for step in losses:  # CUDA kernels (atomics in embedding backward) need not be bitwise reproducible
        assert losses[step] == pytest.approx(reference[step], rel=1e-2), step


@pytest.mark.parametrize("config", list(CONFIGS))
def test_engine_trains_in_bf16(config, ddp_run, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_sft(_args(run_dir, cache_dir, *CONFIGS[config]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in _metrics(run_dir) if "loss" in r]
    assert len(rows) == STEPS and all(r["loss"] == r["loss"] for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["peak_mem_gib"] > 0 for r in rows)
    if "lora" not in config:
        # The same weights and batch before any update: the first loss agrees with ddp's up to bf16 compute.
        assert rows[0]["loss"] == pytest.approx(_losses(ddp_run)[1], rel=2e-2)
