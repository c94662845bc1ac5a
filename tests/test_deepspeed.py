"""DeepSpeed ZeRO 0-3 through `sft run` with 2 real ranks: the same numbers as DDP, and bad settings refused."""

import json
import os
from itertools import pairwise

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_sft

QUICKSTART = "recipes/quickstart.yaml"


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


# Large enough that weights trained with and without decay differ clearly within 4 steps (a 4% shrink).
WEIGHT_DECAY = 10.0


def _run(run_dir, cache_dir, *extra):
    args = ["run", QUICKSTART, "--nproc", "2", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=4",
            "train.gradient_accumulation_steps=2", "train.micro_batch_size=8", "train.eval_every=2", "train.eval_generate=0",
            "logging.every_steps=1", f"train.weight_decay={WEIGHT_DECAY}", *extra]
    proc = run_sft(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _losses(run_dir)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, _run(run_dir, cache_dir, "strategy.backend=ddp")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_compute_what_ddp_computes(tmp_path, cache_dir, ddp_reference, stage):
    ddp_dir, (ddp_loss, ddp_eval) = ddp_reference
    export = "export.on_finish=true" if stage == 3 else "export.on_finish=false"
    loss, eval_loss = _run(tmp_path / "run", cache_dir, "strategy.backend=deepspeed", f"strategy.zero_stage={stage}", export)
    assert len(loss) == 4 and loss[-1] < loss[0]
    assert loss == pytest.approx(ddp_loss, rel=1e-4) and eval_loss == pytest.approx(ddp_eval, rel=1e-4)
    if stage == 3:
        # ZeRO-3's export gathers the partitioned weights: not empty, and equal to DDP's (weight decay included).
        ours, ref = load_file(tmp_path / "run" / "final" / "model.safetensors"), load_file(ddp_dir / "final" / "model.safetensors")
        assert set(ours) == set(ref) and all(ours[k].numel() > 0 for k in ours)
        assert max((ours[k] - ref[k]).abs().max().item() for k in ref) < 1e-4
        # The parameters were empty 1-D partitions when the AdamW groups were made: the decay group still
        # holds the matrices (each rank's fp32 partition of it), the other only the norm weights.
        for rank in (0, 1):
            saved = torch.load(tmp_path / "run" / "checkpoints" / "step-000004" / "model" / "deepspeed" /
                               f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
            groups = saved["optimizer_state_dict"]["param_groups"]
            numel = {g["weight_decay"]: flat.numel() for g, flat in zip(groups, saved["fp32_flat_groups"])}
            assert numel[WEIGHT_DECAY] > 100 * numel[0.0], numel


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy.zero_stage=4"], "is not a ZeRO stage"),
        (["strategy.zero_stage=2", "strategy.offload_params=true"], "needs `strategy.zero_stage: 3`"),
        (["strategy.deepspeed_config={train_micro_batch_size_per_gpu: 4}"], "the recipe gives 16 (from train.micro_batch_size)"),
        (["strategy.deepspeed_config={zero_optimization: {stage: 1}}"], "strategy.zero_stage is 2"),
        (["strategy.deepspeed_config=/no/such/ds.json"], "/no/such/ds.json does not exist"),
        (["model.dtype=float16"], "float16 needs a GPU"),
    ],
)
def test_bad_deepspeed_settings_fail_before_workers(tmp_path, cache_dir, overrides, message):
    proc = run_sft(["run", QUICKSTART, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", "strategy.backend=deepspeed", *overrides])
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_user_deepspeed_config_file_is_merged(tmp_path):
    from launcher.engines.deepspeed import make_config
    from launcher.recipe import load_recipe

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "train_batch_size": "auto"}))
    recipe = load_recipe(QUICKSTART, ["strategy.backend=deepspeed", "strategy.zero_stage=3", f"strategy.deepspeed_config={ds}"])
    config = make_config(recipe, world_size=2, accumulation=1, device_type="cpu")
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True}
    assert config["train_batch_size"] == 32 and config["gradient_clipping"] == 1.0
    inline = load_recipe(QUICKSTART, ["strategy.backend=deepspeed", "strategy.deepspeed_config={train_batch_size: auto}"])
    make_config(inline, world_size=2, accumulation=1, device_type="cpu")
    assert inline.strategy.deepspeed_config == {"train_batch_size": "auto"}  # the recipe is not edited


def test_user_optimizer_and_scheduler_blocks_are_refused(tmp_path, cache_dir):
    from launcher.engines.deepspeed import make_config
    from launcher.errors import UserError
    from launcher.recipe import load_recipe

    block = {"optimizer": "{optimizer: {type: AdamW, params: {lr: 0.1}}}", "scheduler": "{scheduler: {type: WarmupLR}}",
             "checkpoint": "{checkpoint: {use_node_local_storage: true}}"}
    for name, keys in (("optimizer", "train.lr, train.weight_decay"), ("scheduler", "train.lr_scheduler, train.warmup_steps"),
                       ("checkpoint", "checkpoint.every_steps")):
        recipe = load_recipe(QUICKSTART, ["strategy.backend=deepspeed", f"strategy.deepspeed_config={block[name]}"])
        with pytest.raises(UserError, match=f"strategy.deepspeed_config has a `{name}` block") as e:
            make_config(recipe, world_size=2, accumulation=1, device_type="cpu")
        assert keys in str(e.value)
    # `sft plan` refuses it too (a file, as users write them), before anything runs.
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100}}}))
    proc = run_sft(["plan", QUICKSTART, f"data.cache_dir={cache_dir}", "strategy.backend=deepspeed", f"strategy.deepspeed_config={ds}"])
    assert proc.returncode == 2 and "has a `scheduler` block" in proc.stderr and "Traceback" not in proc.stderr


# `sft run` in-process (one rank) with the 3rd training forward's logits made NaN, through torch's global
# forward hook: a real non-finite gradient, which DeepSpeed ZeRO skips as it skips an fp16 overflow
# (fp16 itself needs a GPU). Everything else is the real run.
_NAN_AT_STEP_3 = """
import sys, torch
from launcher.cli import main
calls = 0
def poison(module, args, output):
    # The decoder's hidden states: the loss is computed from them through the head, in chunks or not.
    global calls
    if type(module).__name__ == "LlamaModel" and module.training:
        calls += 1
        if calls == 3:
            output.last_hidden_state = output.last_hidden_state * float("nan")
    return output
torch.nn.modules.module.register_module_forward_hook(poison)
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_step_deepspeed_skips_does_not_advance_the_lr_schedule(tmp_path, cache_dir):
    import subprocess
    import sys

    from conftest import REPO

    run_dir = tmp_path / "run"
    args = ["run", QUICKSTART, "--nproc", "1", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", "strategy.backend=deepspeed",
            "strategy.zero_stage=2", "train.max_steps=6", "train.eval_at_start=false", "train.eval_every=0", "train.eval_generate=0",
            "logging.every_steps=1", "export.on_finish=false"]
    # LOCAL_RANK as torchrun sets it: DeepSpeed asserts on it, and a one-rank run in-process has none.
    proc = subprocess.run([sys.executable, "-c", _NAN_AT_STEP_3, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LOCAL_RANK": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[3].get("skipped") is True and [rows[s].get("skipped_steps") for s in rows] == [None, None, 1, 1, 1, 1]
    # Warmup raises the lr every applied step; the step after the skipped one gets the skipped step's lr again.
    lrs = [rows[s]["lr"] for s in sorted(rows)]
    assert lrs[3] == lrs[2] and all(a < b for a, b in pairwise(lrs[:3])) and all(a < b for a, b in pairwise(lrs[3:]))
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (4, 5, 6))  # finite: the NaN step left the weights alone
    state = json.loads((run_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 5  # 5 applied steps: a resume continues the schedule where it was
