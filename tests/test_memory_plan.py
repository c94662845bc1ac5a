"""The plan's memory lines and data statistics, in process (no training): the fit verdict and its
suggestions follow the estimate, and the padding share is what the training collator pads.
The estimate itself is checked against measured bytes in tests/test_sharding.py."""

from dataclasses import replace

import pytest

from conftest import REPO
from launcher.memory import GIB, describe, estimate


@pytest.fixture(scope="module")
def plan_of(cache_dir):
    from launcher.plan import format_plan, make_plan
    from launcher.recipe import load_recipe

    def make(*overrides):
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"data.cache_dir={cache_dir}", *overrides])
        plan = make_plan(recipe)
        return plan, format_plan(plan, recipe)

    return make


def test_memory_shrinks_with_ranks_and_sharding_and_lora(plan_of):
    plan, _ = plan_of()
    s = replace(plan.memory, weight_bytes=2, world=8)
    ddp, z3, fsdp = (estimate(replace(s, backend=b, zero_stage=3)) for b in ("ddp", "deepspeed", "fsdp"))
    # ddp trains fp32 weights under bf16 autocast; ZeRO-3 holds a 16-bit shard (its fp32 master is sharded too)
    assert ddp.params == pytest.approx(4 * s.params) and z3.params == pytest.approx(2 * s.params / 8)
    assert fsdp.optimizer == pytest.approx(8 * s.params / 8)
    assert z3.state < ddp.state and fsdp.state < ddp.state
    lora = estimate(replace(s, trainable=s.lora_trainable))
    assert lora.grads < 0.5 * ddp.grads and lora.params >= 2 * s.params  # the frozen base is still held (16-bit)
    ckpt = estimate(replace(s, gradient_checkpointing=True))
    assert ckpt.activations < ddp.activations / 2
    off = estimate(replace(s, backend="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True))
    assert off.optimizer == off.master == off.params == 0 and off.cpu > 0


def test_plan_says_whether_it_fits_and_what_would(plan_of):
    _, fits = plan_of("launch.gpu_memory_gib=80")
    assert "fits launch.gpu_memory_gib of 80.00 GiB" in fits
    plan, text = plan_of("launch.gpu_memory_gib=0.05", "train.micro_batch_size=64", "train.gradient_accumulation_steps=1",
                         "launch.nproc_per_node=2", "strategy.backend=ddp")
    assert "does NOT fit launch.gpu_memory_gib of 51.2 MiB" in text and "train.micro_batch_size=1" in text
    # every change it offers fits when applied; DDP at 2 ranks is told about ZeRO-3 when that fits
    s = plan.memory
    budget = 0.9 * 0.05 * GIB
    assert estimate(replace(s, micro_batch=1)).gpu_total <= budget
    lines = describe(replace(s, micro_batch=1), 0.05 * GIB, "x")
    assert "fits x" in lines[-1]


def test_padding_share_is_what_training_pads(tmp_path, cache_dir):
    import json

    import torch

    from launcher.plan import format_plan, make_plan
    from launcher.recipe import load_recipe
    from launcher.train import step_batches

    rows = [{"prompt": "w " * (1 + (7 * i) % 23), "completion": "x " * (1 + i % 5)} for i in range(64)]
    rows[5]["prompt"] = "w " * 200  # dropped as too long: not in the statistics
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_args = [f"data.cache_dir={cache_dir}", f"data.train_files=[{data}]",
                         "data.eval_files=[]", "data.eval_fraction=0.25", "data.too_long=drop", "data.max_seq_len=40", "data.format=completion", "train.micro_batch_size=4", "train.eval_every=0",
                         "train.eval_generate=0", "train.eval_at_start=false", "launch.nproc_per_node=2"]
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [*recipe_args, "data.packing=false"])
    plan = make_plan(recipe)
    packed = make_plan(load_recipe(REPO / "recipes" / "quickstart.yaml", [*recipe_args, "data.packing=true"]))
    assert packed.padding == 0.0
    from launcher.data.prepare import prepare
    from launcher.model import load_tokenizer, model_dir
    from launcher.cache import cache_root

    cache = cache_root(recipe.data.cache_dir)
    tok = load_tokenizer(model_dir(recipe.model, cache), recipe.model)
    prepared = prepare(recipe.data, tok, cache, recipe.seed, recipe.task)
    train = prepared.train  # a selection (eval_fraction) of a filtered file: index mappings on both
    slots = real = 0
    for step in range(plan.schedule.batches.steps_per_epoch):
        for rank in range(2):
            for b in step_batches(train, plan.schedule, step, rank, tok.pad_token_id, torch.device("cpu")):
                slots += b["attention_mask"].numel()
                real += int(b["attention_mask"].sum())
    assert plan.padding == pytest.approx(1 - real / slots)
    lengths = [len(x) for x in train["input_ids"]]
    kept = sorted(lengths + [len(x) for x in prepared.eval["input_ids"]])
    assert plan.files[0].kept == 63 and sorted(plan.files[0].lengths.tolist()) == kept
    text = format_plan(plan, recipe)
    assert f"max {max(kept)};" in text and f"padding: {100 * (1 - real / slots):.0f}%" in text
    assert plan.memory.seq_len == max(lengths)
