"""Every family of the gallery, built tiny (helpers/standins.py), tied and untied embeddings, dense and
mixture-of-experts: planned for full and LoRA fine-tuning on fsdp and ZeRO-3 (cheap, no weights),
and, marked slow, trained for two steps on 2 gloo ranks and exported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from helpers import standins
from launcher.data.tokenize import IGNORE

FAMILIES = list(standins.FAMILIES)  # llama3.1, qwen2.5 (untied), qwen2.5-small (tied), qwen3, mistral, gemma2, gemma3, phi3, qwen3-moe
ENGINES = {"fsdp": ["strategy.backend=fsdp"], "zero3": ["strategy.backend=deepspeed", "strategy.zero_stage=3"]}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch-data") / "train.jsonl"
    path.write_text("".join((REPO / "recipes/data/quickstart/train.jsonl").read_text().splitlines(keepends=True)[:48]))
    return path


def _overrides(standin, data, cache_dir, out, engine, lora):
    return ["model.path=" + str(standin), f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_fraction=0.1", "data.max_seq_len=256", f"data.cache_dir={cache_dir}",
            f"output_dir={out}", "train.micro_batch_size=4", "train.max_steps=2", "train.eval_generate=0", "train.eval_at_start=false",
            "train.eval_every=0", "logging.every_steps=1", "launch.nproc_per_node=2", "export.verify_prompts=2", f"lora.enabled={str(lora).lower()}", *ENGINES[engine]]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_plans_full_and_lora_on_fsdp_and_zero3(family, small_data, tmp_path_factory, tmp_path, cache_dir, capsys):
    from launcher.plan import make_plan
    from launcher.recipe import load_recipe

    standin = standins.build(family, tmp_path_factory.getbasetemp() / f"standin-{family}")
    tied = json.loads((standin / "config.json").read_text())["tie_word_embeddings"]
    for engine, lora in (("fsdp", False), ("fsdp", True), ("zero3", False), ("zero3", True)):
        recipe = load_recipe(REPO / "recipes/quickstart.yaml", _overrides(standin, small_data, cache_dir, tmp_path / "run", engine, lora))
        plan = make_plan(recipe)  # LoRA with the defaults: [all-linear], dropout 0.05
        assert plan.architecture == standins.FAMILIES[family]["config"]["architectures"][0]
        assert (plan.trainable is None) == (not lora) and plan.train_examples > 0
    assert tied in (True, False)
    if family == "qwen3-moe":  # fused experts: adapted by peft without dropout, and said so
        assert "experts are fused parameters (experts.down_proj, experts.gate_up_proj)" in capsys.readouterr().err


def test_phi3_template_trains_each_turn_although_it_ends_the_conversation_with_eos(tmp_path_factory, cache_dir):
    from launcher.data.tokenize import tokenize_conversation
    from launcher.model import load_tokenizer
    from launcher.recipe import ModelConfig

    tok = load_tokenizer(standins.build("phi3", tmp_path_factory.getbasetemp() / "standin-phi3"), ModelConfig(path="x"))
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    enc = tokenize_conversation(tok, messages)
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == ["4<|end|>", "6<|end|>\n<|endoftext|>"]


# Every family on both engines, LoRA on one and full fine-tuning on the other (alternating, so each
# engine x LoRA pair covers tied and untied models); the MoE model with the LoRA defaults on both engines.
# One 2-rank process trains all cells in turn (helpers/arch_matrix.py): imports and the group are paid once.
MATRIX = [(f, e, (i + (e == "zero3")) % 2 == 0) for i, f in enumerate(FAMILIES) for e in ENGINES]
MATRIX = [(f, e, True if f == "qwen3-moe" else lora) for f, e, lora in MATRIX]


@pytest.mark.slow
def test_every_family_trains_on_two_ranks_on_fsdp_and_zero3_and_exports(small_data, tmp_path_factory, tmp_path, cache_dir):
    def cell(family, engine, lora):
        standin = standins.build(family, tmp_path_factory.getbasetemp() / f"standin-{family}-weights", weights=True)
        out = tmp_path / f"{family}-{engine}"
        return {"family": family, "engine": engine, "lora": lora, "out": str(out), "overrides": _overrides(standin, small_data, cache_dir, out, engine, lora)}

    spec = tmp_path / "matrix.json"
    spec.write_text(json.dumps({"cells": [cell(*c) for c in MATRIX]}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "tests/helpers/arch_matrix.py"), str(spec)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "matrix.json.result.json").read_text())
    assert [(r["family"], r["engine"], r["lora"]) for r in results] == MATRIX
    assert {(e, lora) for _, e, lora in MATRIX} == {(e, lora) for e in ENGINES for lora in (True, False)}
    for r in results:
        out = Path(r["out"])
        assert (out / "final" / "config.json").is_file() and list((out / "final").glob("*.safetensors")), r
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), r
        assert not r["zero3_leaked"], r  # run() again in one process: no ZeRO-3 state left from the cell before
        assert r["max_abs_logit_diff"] <= r["tolerance"], r  # the export against the live model (export.py also checks this)
