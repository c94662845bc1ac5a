"""The code paths that differ on CUDA, checked here on CPU where they can be: the process group's
backends, ddp's bf16 mixed precision (fp32 master weights), RNG resume on fewer devices, flash
attention selection. What needs a GPU is in tests/test_gpu.py (benchmarks/gpu.sh runs it)."""

import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

from conftest import REPO

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def test_process_group_serves_cpu_and_cuda_tensors():
    """The loop all-reduces CPU tensors on every device; NCCL alone would refuse them."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from launcher.dist import backend_for

    assert backend_for(torch.device("cpu")) == "gloo"
    cuda = backend_for(torch.device("cuda", 3))
    assert BackendConfig(Backend(cuda)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def _batches(cache_dir):
    from launcher.builtin import materialize
    from launcher.data.batches import pad_collate
    from launcher.data.tokenize import tokenize_conversation
    from launcher.model import load_tokenizer
    from launcher.recipe import ModelConfig

    sys.path.insert(0, str(REPO / "tests"))
    from helpers.grads import CONVERSATIONS

    tok = load_tokenizer(materialize("builtin:tiny-llama", cache_dir), ModelConfig(path="builtin:tiny-llama"))
    rows = [tokenize_conversation(tok, c) for c in CONVERSATIONS]
    return [pad_collate([r["input_ids"] for r in rows], [r["labels"] for r in rows], tok.pad_token_id)]


def _one_step(backend, cache_dir, batches):
    """One optimizer step at lr 1e-5 in bf16, built as the worker builds it (one rank, in process).
    Returns (weights before, weights after, the engine)."""
    from launcher import engines
    from launcher.builtin import materialize
    from launcher.dist import Dist
    from launcher.model import load_model
    from launcher.recipe import load_recipe
    from launcher.train import train_step

    recipe = load_recipe(QUICKSTART, [f"strategy.backend={backend}", "model.dtype=bfloat16", "train.lr=1e-5",
                                      f"data.cache_dir={cache_dir}"])
    path = materialize(recipe.model.path, cache_dir)
    dist = Dist()
    model = load_model(path, recipe.model, engines.load_dtype(recipe, dist.device), dist.device)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    engine = engines.build(recipe, model, dist, accumulation=1)
    train_step(engine, batches, dist, recipe.train.max_grad_norm)

    def full(p):
        return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()

    after = {n: full(p) for n, p in engine.unwrapped().named_parameters()}
    return before, after, engine


def test_ddp_bf16_keeps_fp32_master_weights_and_matches_fsdp(cache_dir):
    batches = _batches(cache_dir)
    before, ddp_after, ddp = _one_step("ddp", cache_dir, batches)
    # What is trained and what AdamW keeps is fp32; the forward ran in bf16 (autocast).
    assert {p.dtype for p in ddp.unwrapped().parameters()} == {torch.float32}
    assert {v.dtype for s in ddp.optimizer.state.values() for v in s.values() if v.is_floating_point() and v.ndim} == {torch.float32}
    with torch.no_grad():
        logits = ddp.model(input_ids=batches[0]["input_ids"][:, :4]).logits
    assert logits.dtype == torch.bfloat16
    # An lr 1e-5 step changes (nearly) every element of every matrix: in bf16 it would round away
    # (half an ulp of a 0.02 weight is ~6e-5).
    for name, w in before.items():
        if w.ndim == 2:
            changed = (ddp_after[name] != w).float().mean().item()
            assert changed > 0.9, f"{name}: only {changed:.0%} of the elements changed"
            in_bf16 = (w.bfloat16() + (ddp_after[name] - w)).bfloat16()  # the same update on bf16 weights
            assert (in_bf16 == w.bfloat16()).float().mean().item() > 0.5, name  # ...mostly rounds away
    try:
        fsdp_before, fsdp_after, _ = _one_step("fsdp", cache_dir, batches)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    # Same weights to start with, the same update up to bf16 compute differences: Adam's first step
    # is ~lr * sign(grad), so a few sign flips of tiny gradients are all that may differ.
    for name, w in before.items():
        assert torch.equal(fsdp_before[name], w)
        d_ddp, d_fsdp = ddp_after[name] - w, fsdp_after[name] - w
        assert (d_ddp - d_fsdp).abs().mean().item() < 0.1 * d_fsdp.abs().mean().item(), name


def test_ddp_bf16_lora_keeps_the_frozen_base_in_bf16(cache_dir):
    """A frozen base is never updated, so ddp leaves it bf16; adapters and modules_to_save train in fp32."""
    from launcher import engines
    from launcher.builtin import materialize
    from launcher.dist import Dist
    from launcher.model import add_lora, load_model
    from launcher.recipe import load_recipe
    from launcher.train import train_step

    recipe = load_recipe(QUICKSTART, ["strategy.backend=ddp", "model.dtype=bfloat16", "train.lr=1e-5", "lora.enabled=true",
                                      "lora.modules_to_save=[lm_head]", f"data.cache_dir={cache_dir}"])
    dist = Dist()
    assert engines.load_dtype(recipe, dist.device) == torch.bfloat16
    model = load_model(materialize(recipe.model.path, cache_dir), recipe.model, torch.bfloat16, dist.device)
    engine = engines.build(recipe, add_lora(model, recipe.lora), dist, accumulation=1)
    params = dict(engine.unwrapped().named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert any("modules_to_save" in n for n in trained) and any("lora_B" in n for n in trained)
    assert {params[n].dtype for n in trained} == {torch.float32}
    assert {p.dtype for n, p in params.items() if n not in trained} == {torch.bfloat16}
    train_step(engine, _batches(cache_dir), dist, recipe.train.max_grad_norm)
    assert all(params[n].abs().sum() > 0 for n in trained if "lora_B" in n)  # zero at start; one step moved them


@pytest.mark.slow
def test_zero3_on_one_rank_runs_in_process(tmp_path, cache_dir):
    """One GPU: `sft run` runs the worker in process, without torchrun's environment, and DeepSpeed's
    zero.Init reads LOCAL_RANK from it (KeyError before)."""
    from conftest import run_sft

    assert "LOCAL_RANK" not in os.environ
    proc = run_sft(["run", str(QUICKSTART), "--nproc", "1", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
                    "strategy.backend=deepspeed", "strategy.zero_stage=3", "train.max_steps=1", "train.eval_at_start=false",
                    "train.eval_every=0", "train.eval_generate=0", "data.eval_files=[]", "export.on_finish=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_rng_checkpoint_is_no_pickle_and_restores_exactly(tmp_path):
    from safetensors import safe_open

    from launcher import checkpoint

    (tmp_path / "rng").mkdir()
    random.gauss(0, 1)
    np.random.normal()  # both keep a cached gaussian that must round-trip too
    checkpoint.save_rng(checkpoint._rng_file(tmp_path, 0))
    expected = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(), np.random.normal(), torch.rand(4).tolist())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert checkpoint.restore_rng(tmp_path, 0)
    assert (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(), np.random.normal(), torch.rand(4).tolist()) == expected
    (saved,) = (tmp_path / "rng").iterdir()
    assert saved.name == "rank-00000.safetensors"
    with safe_open(str(saved), framework="pt") as f:  # tensors and JSON text: nothing that can run code
        assert set(f.keys()) <= {"torch", "cuda"} and set(f.metadata()) == {"python", "numpy"}
    assert not checkpoint.restore_rng(tmp_path, 1)


def test_rng_of_an_older_checkpoint_loads_without_running_code(tmp_path):
    """Checkpoints written before hold a pickle: it is read with weights_only=True (tensors, numpy's
    state array) and a pickle that would call anything else is refused."""
    from launcher import checkpoint

    (tmp_path / "rng").mkdir()
    eight_gpus = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": eight_gpus}
    torch.save(old, tmp_path / "rng" / "rank-00000.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    assert checkpoint.restore_rng(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"python": Evil()}, tmp_path / "rng" / "rank-00001.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.restore_rng(tmp_path, 1)


def test_rng_resume_on_fewer_devices_takes_the_local_state():
    """A rank restores only its own device's CUDA state: resuming with 2 GPUs per node from a node
    that had 8 must not set the states of devices that are not there (set_rng_state_all raised)."""
    from launcher.checkpoint import local_cuda_state

    mine = torch.full((16,), 7, dtype=torch.uint8)
    assert local_cuda_state(mine, 1) is mine  # this format: the rank saved its own device's state
    eight_gpus = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # before: every device of the node
    assert torch.equal(local_cuda_state(eight_gpus, 1), eight_gpus[1])
    assert local_cuda_state(eight_gpus[:2], 5) is None and local_cuda_state(None, 0) is None


def test_flash_attention_needs_its_package_and_a_gpu(cache_dir):
    from importlib.metadata import PackageNotFoundError, distribution

    from launcher.errors import UserError
    from launcher.plan import check_attention
    from launcher.recipe import load_recipe

    def recipe(name):
        return load_recipe(QUICKSTART, [f"model.attn_implementation={name}"])

    check_attention(recipe("sdpa"), cuda=False)
    try:
        distribution("flash-attn")
        pytest.skip("flash-attn is installed here")
    except PackageNotFoundError:
        pass
    for cuda in (False, True, None):  # a missing package fails on every machine, also for sft submit
        with pytest.raises(UserError, match="flash_attention_2 is not available here.*`flash-attn` package.*sdpa"):
            check_attention(recipe("flash_attention_2"), cuda=cuda)
    with pytest.raises(UserError, match="flash_attention_3 is not available here.*flash-attn-3"):
        check_attention(recipe("flash_attention_3"), cuda=True)
    # A package that is installed: transformers' own name for it passes the package check, then the GPU one.
    from launcher import plan

    plan.FLASH_ATTENTION["flash_attention_x"] = "torch"
    try:
        check_attention(recipe("flash_attention_x"), cuda=True)
        check_attention(recipe("flash_attention_x"), cuda=None)  # sft submit: the job's nodes have the GPUs
        with pytest.raises(UserError, match="runs on NVIDIA GPUs only, and torch sees no CUDA device"):
            check_attention(recipe("flash_attention_x"), cuda=False)
    finally:
        del plan.FLASH_ATTENTION["flash_attention_x"]


def test_plan_refuses_flash_attention_before_workers_start(tmp_path, cache_dir):
    from launcher.errors import UserError
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
                                      "model.attn_implementation=flash_attention_2"])
    with pytest.raises(UserError, match="model.attn_implementation: flash_attention_2"):
        make_plan(recipe)
