"""On CUDA: exact match by batched generation in lockstep under ZeRO-3 and FSDP2 finishes and agrees
with ddp (2 ranks with 2 GPUs; with one GPU, 1 rank, and lockstep forced through synced_gpus on
one rank in-process). Run with `pytest -m gpu`; skipped without CUDA."""

import json
import subprocess

import pytest
import torch

from conftest import run_sft
from test_generation_ranks import QUICKSTART, model_and_data  # noqa: F401  (the fixture: a model that stops early on some rows)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _eval(root, backend, cache_dir):
    nproc = min(2, torch.cuda.device_count())
    run_dir = root / f"gpu-{backend.replace('=', '-').replace(' ', '_')}"
    args = ["run", QUICKSTART, "--nproc", str(nproc), f"output_dir={run_dir}", f"data.cache_dir={cache_dir}",
            f"model.path={root / 'model'}", "model.dtype=float32", f"data.train_files=[{root / 'eval.jsonl'}]",
            f"data.eval_files=[{root / 'eval.jsonl'}]", "data.max_seq_len=80", "train.max_steps=1", "train.micro_batch_size=2",
            "train.lr=1e-12", "train.eval_at_start=false", "train.eval_generate=50", "export.on_finish=false",
            "checkpoint.every_minutes=0", "launch.collective_timeout_s=120", *backend.split()]
    try:
        proc = run_sft(args, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{backend} on CUDA: the run hung at evaluation")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_exact_match" in r][-1]


def test_lockstep_generation_on_cuda_agrees_across_engines(model_and_data, cache_dir):  # noqa: F811
    root, expected = model_and_data
    ddp = _eval(root, "strategy.backend=ddp", cache_dir)
    assert ddp["eval_exact_match"] == pytest.approx(expected, abs=0.2)  # float32 on GPU: kernels differ from CPU
    for backend in ("strategy.backend=fsdp", "strategy.backend=deepspeed strategy.zero_stage=3"):
        other = _eval(root, backend, cache_dir)
        assert other["eval_exact_match"] == ddp["eval_exact_match"], backend
        assert abs(other["eval_loss"] - ddp["eval_loss"]) < 1e-3, backend


def test_synced_batched_generation_on_one_gpu_equals_unsynced(model_and_data):  # noqa: F811
    """synced_gpus on a 1-rank group runs the lockstep code path (an all-reduce per token) on CUDA."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher import generation

    root, _ = model_and_data
    tok = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).cuda().eval()
    rows = [json.loads(line)["messages"][:1] for line in (root / "eval.jsonl").read_text().splitlines()]
    prompts = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for m in rows]
    stop = generation.stop_ids(model, tok)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        synced = generation.generate(model, prompts, 16, tok.pad_token_id, stop, "cuda", True)
    finally:
        if created:
            dist.destroy_process_group()
    assert synced == generation.generate(model, prompts, 16, tok.pad_token_id, stop, "cuda", False)
