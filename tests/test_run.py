"""`sft plan` and `sft run` end to end, as a user runs them: real processes, real files.

The exported model is loaded in a fresh interpreter that never imports the launcher,
so `final/` is shown to be usable by `transformers` alone.
"""

import json
import subprocess
import sys

import pytest

from conftest import run_sft

QUICKSTART = "recipes/quickstart.yaml"


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _short(run_dir, cache_dir, *extra):
    return [f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=6", "train.eval_every=3",
            "train.eval_generate=4", "logging.every_steps=2", *extra]


def test_plan_prints_the_numbers(cache_dir):
    proc = run_sft(["plan", QUICKSTART, f"data.cache_dir={cache_dir}", "--nproc", "2", "train.gradient_accumulation_steps=2"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world size 2" in out
    assert "micro 16 x accumulation 2 x 2 ranks = global 64 sequences" in out
    assert "62 per epoch, 186 total, 20 warmup" in out  # 4000 // 64 = 62 steps, 3 epochs
    assert "4000 rows, 4000 kept" in out and "'<|im_end|>' is trained" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["recipes/missing.yaml"], "missing.yaml does not exist"),
        ([QUICKSTART, "train.lrr=1"], "Did you mean `train.lr`"),
        ([QUICKSTART, "model.path=/no/such/model"], "/no/such/model is not a directory"),
        ([QUICKSTART, "data.train_files=[/no/such.jsonl]"], "/no/such.jsonl does not exist"),
        ([QUICKSTART, "train.gradient_accumulation_steps=null", "train.global_batch_size=100", "--nproc", "3"], "not a multiple of micro_batch_size x world size"),
    ],
)
def test_plan_rejects_bad_input_without_traceback(cache_dir, args, message):
    proc = run_sft(["plan", *args, f"data.cache_dir={cache_dir}"])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_two_rank_run_logs_evaluates_and_exports(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_sft(["run", QUICKSTART, "--nproc", "2", *_short(run_dir, cache_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]  # eval_at_start, every 3, and at the end
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"eval_perplexity", "eval_token_accuracy", "eval_exact_match"} <= set(evals[-1])
    for rank in (0, 1):
        assert (run_dir / "logs" / f"rank-{rank}.log").is_file()
    assert not list((run_dir / "logs").glob("*.alive"))  # heartbeats end with the process group
    saved = (run_dir / "recipe.yaml").read_text()
    assert "nproc_per_node: 2" in saved and "max_steps: 6" in saved

    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(final)!r})
model = AutoModelForCausalLM.from_pretrained({str(final)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "repeat: a b c d"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
eos = model.generation_config.eos_token_id
print(json.dumps({{"new": out.shape[1] - ids["input_ids"].shape[1], "eos": eos if isinstance(eos, list) else [eos],
                   "im_end": tok.convert_tokens_to_ids("<|im_end|>"), "launcher": "launcher" in __import__("sys").modules}}))
"""
    fresh = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert result["new"] >= 1 and not result["launcher"]
    assert result["im_end"] in result["eos"]  # generation stops at the end-of-turn token it was trained on

    no_adapter = run_sft(["export", str(run_dir), "--out", str(tmp_path / "adapter"), "--adapter-only"])
    assert no_adapter.returncode == 2 and "has no adapter" in no_adapter.stderr and not (tmp_path / "adapter").exists()


def test_output_dir_of_another_run_is_not_touched(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = run_sft(["run", QUICKSTART, *_short(run_dir, cache_dir, "export.on_finish=false", "train.eval_generate=0")])
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    again = run_sft(["run", QUICKSTART, *_short(run_dir, cache_dir, "export.on_finish=false", "train.eval_generate=0", "train.lr=0.1")])
    assert again.returncode == 2 and "recipe differs in: train.lr" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    other = run_sft(["run", QUICKSTART, *_short(tmp_path / "mine", cache_dir)])
    assert other.returncode == 2 and "not an sft-launcher run" in other.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    replaced = run_sft(["run", QUICKSTART, "--overwrite", *_short(run_dir, cache_dir, "export.on_finish=false", "train.eval_generate=0", "train.lr=0.1")])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "lr: 0.1" in (run_dir / "recipe.yaml").read_text()


def test_runs_are_deterministic(tmp_path, cache_dir):
    losses = []
    for name in ("a", "b"):
        proc = run_sft(["run", QUICKSTART, *_short(tmp_path / name, cache_dir, "export.on_finish=false", "train.eval_generate=0", "logging.every_steps=1")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append([r["loss"] for r in _metrics(tmp_path / name) if "loss" in r])
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_quickstart_learns_the_task(tmp_path, cache_dir):
    """The README's promise: held-out exact match goes from about 0 to >= 0.8, and final/ is written."""
    run_dir = tmp_path / "quickstart"
    proc = run_sft(["run", QUICKSTART, f"output_dir={run_dir}", f"data.cache_dir={cache_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in _metrics(run_dir) if "eval_exact_match" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_exact_match"] <= 0.05
    assert evals[-1]["eval_exact_match"] >= 0.8
    assert "eval_exact_match: 0.0000 ->" in proc.stderr
    assert (run_dir / "final" / "config.json").is_file()


def test_classification_quickstart_learns_the_task(tmp_path, cache_dir):
    """The README's promise for recipes/quickstart-classify.yaml: held-out accuracy from about chance
    (0.25) to >= 0.9, printed at the end with the per-class table."""
    run_dir = tmp_path / "quickstart-classify"
    proc = run_sft(["run", "recipes/quickstart-classify.yaml", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in _metrics(run_dir) if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_accuracy"] <= 0.4
    assert evals[-1]["eval_accuracy"] >= 0.9
    assert f"eval_accuracy: {evals[0]['eval_accuracy']:.4f} -> {evals[-1]['eval_accuracy']:.4f}" in proc.stderr
    assert "confusion matrix" in proc.stderr and (run_dir / "final" / "classification.json").is_file()


def test_builtin_qwen2_with_gradient_checkpointing(tmp_path, cache_dir):
    run_dir = tmp_path / "qwen"
    proc = run_sft(["run", QUICKSTART, "model.path=builtin:tiny-qwen2", "model.gradient_checkpointing=true",
                    *_short(run_dir, cache_dir, "train.max_steps=2", "train.eval_generate=0", "export.on_finish=false")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Qwen2ForCausalLM" in proc.stdout
    assert [r["step"] for r in _metrics(run_dir) if "loss" in r] == [2]
