"""Sharding is measured from the tensors each rank holds (benchmarks/memory_scaling.py), at 2 ranks.

One torchrun per engine; each worker takes a real optimizer step on the builtin tiny model
and counts the distinct storages its rank holds (params, gradients at their peak, AdamW
state including any fp32 master copy).
"""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import memory_scaling  # noqa: E402


@pytest.fixture(scope="module")
def measured(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("sharding")
    out = {}
    for engine, stage in memory_scaling.CONFIGS:
        lbl = memory_scaling.label(engine, stage)
        out[lbl] = memory_scaling.run_worker(engine, stage, 2, tmp / f"{lbl}.json", cache_dir, timeout=300)
    return out


def _rank0(measured, lbl):
    r = measured[lbl]
    if "ranks" not in r:
        if lbl == "fsdp":
            pytest.skip(f"fsdp engine unavailable: {r['error'][-500:]}")
        pytest.fail(f"{lbl} worker failed:\n{r['error']}")
    assert r["world_size"] == 2
    return r["ranks"][0]


def _close(a, b, tol=0.10):
    return abs(a - b) <= tol * b


def test_zero3_shards_parameters_gradients_and_optimizer_state(measured):
    ddp, z3 = _rank0(measured, "ddp"), _rank0(measured, "zero-3")
    for key in ("params", "grads"):
        assert _close(z3[key], ddp[key] / 2), (key, z3[key], ddp[key])
    assert _close(z3["optimizer_state"], ddp["optimizer"] / 2), (z3, ddp)
    # DeepSpeed also keeps an fp32 master partition (4P/N) even when training in fp32, so its
    # total is 20P/N here; without that copy it is the ZeRO-3 16P/N, i.e. half of DDP's 16P.
    assert z3["total"] - z3["master"] <= 0.55 * ddp["total"], (z3, ddp)
    assert _close(z3["master"], ddp["params"] / 2), (z3, ddp)


def test_fsdp_total_is_at_most_055_of_ddp(measured):
    ddp, fsdp = _rank0(measured, "ddp"), _rank0(measured, "fsdp")
    assert fsdp["total"] <= 0.55 * ddp["total"], (fsdp, ddp)


def test_zero1_shards_optimizer_state_not_params(measured):
    ddp, z1 = _rank0(measured, "ddp"), _rank0(measured, "zero-1")
    # The AdamW moments (without DeepSpeed's fp32 master partition, reported separately).
    assert _close(z1["optimizer_state"], ddp["optimizer"] / 2), (z1, ddp)
    assert _close(z1["params"], ddp["params"]), (z1, ddp)


def test_zero2_shards_optimizer_state_and_gradients_not_params(measured):
    ddp, z2 = _rank0(measured, "ddp"), _rank0(measured, "zero-2")
    assert _close(z2["optimizer_state"], ddp["optimizer"] / 2), (z2, ddp)
    assert _close(z2["grads"], ddp["grads"] / 2), (z2, ddp)
    assert _close(z2["params"], ddp["params"]), (z2, ddp)


@pytest.fixture(scope="module")
def measured_one_rank(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("sharding-1")
    return {memory_scaling.label(e, s): memory_scaling.run_worker(e, s, 1, tmp / f"{e}{s}.json", cache_dir, timeout=300)
            for e, s in memory_scaling.CONFIGS}


@pytest.fixture(scope="module")
def planned(cache_dir):
    """`sft plan`'s memory inputs for the benchmark's model and dtype (builtin tiny-llama, fp32)."""
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"data.cache_dir={cache_dir}", "model.dtype=float32"])
    return make_plan(recipe).memory


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_plan_predicts_the_measured_state_bytes_per_rank(world, planned, request):
    from dataclasses import replace

    from launcher.memory import estimate

    runs = request.getfixturevalue("measured" if world == 2 else "measured_one_rank")
    for engine, stage in memory_scaling.CONFIGS:
        lbl = memory_scaling.label(engine, stage)
        m = runs[lbl]["ranks"][0] if "ranks" in runs[lbl] else pytest.fail(f"{lbl} at {world} rank(s) failed:\n{runs[lbl]['error']}")
        p = estimate(replace(planned, backend=engine, zero_stage=stage or 0, world=world))
        assert _close(p.state, m["total"]), (lbl, world, p, m["total"])
        for predicted, key in ((p.params, "params"), (p.grads, "grads"), (p.optimizer + p.master, "optimizer")):
            assert _close(predicted, m[key]), (lbl, world, key, predicted, m[key])
