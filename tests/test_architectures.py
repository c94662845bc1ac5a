"""Every family of the gallery, built tiny (helpers/standins.py), tied and untied embeddings, dense and
mixture-of-experts: planned for full and LoRA fine-tuning on fsdp and ZeRO-3 (cheap, no weights),
and, marked slow, trained for two steps on 2 gloo ranks and exported."""

import json
import math

import pytest

from conftest import REPO, run_sft
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


# One 2-rank run per family, engines and LoRA alternating so each is covered on tied and untied models;
# the MoE model on both engines with the LoRA defaults.
MATRIX = [("llama3.1", "zero3", True), ("qwen2.5", "fsdp", False), ("qwen2.5-small", "zero3", False), ("qwen3", "fsdp", True),
          ("mistral", "zero3", True), ("gemma2", "fsdp", True), ("gemma3", "zero3", False), ("phi3", "fsdp", False),
          ("qwen3-moe", "fsdp", True), ("qwen3-moe", "zero3", True)]


@pytest.mark.slow
@pytest.mark.parametrize("family, engine, lora", MATRIX, ids=[f"{f}-{e}-{'lora' if lo else 'full'}" for f, e, lo in MATRIX])
def test_family_trains_on_two_ranks_and_exports(family, engine, lora, small_data, tmp_path_factory, tmp_path, cache_dir):
    standin = standins.build(family, tmp_path_factory.getbasetemp() / f"standin-{family}-weights", weights=True)
    out = tmp_path / "run"
    proc = run_sft(["run", "recipes/quickstart.yaml", *_overrides(standin, small_data, cache_dir, out, engine, lora)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "final" / "config.json").is_file() and list((out / "final").glob("*.safetensors"))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
