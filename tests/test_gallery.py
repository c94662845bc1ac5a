"""The recipe gallery: every recipes/*.yaml for a real model family passes `sft plan`, with model.path
pointed at a stand-in of that family (helpers/standins.py: its config shape scaled down, its chat
template) and the recipe's Hub datasets served, tiny, by a Hub on 127.0.0.1 in their real layout."""

import json

import pytest
from datasets import Dataset

from conftest import REPO
from helpers import standins
from helpers.fake_hub import FakeHub, point_at

CHAT = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}] for i in range(600)]
SHAREGPT = [[{"from": "system", "value": "Be brief.", "weight": None}, {"from": "human", "value": f"Name {i}.", "weight": 0.0},
             {"from": "gpt", "value": f"Name {i}", "weight": 1.0}] for i in range(400)]


def _parquet(rows, tmp) -> bytes:
    path = tmp / "x.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    return path.read_bytes()


def _configs(*entries) -> bytes:
    lines = ["---", "configs:"]
    for name, splits in entries:
        lines += [f"- config_name: {name}", "  data_files:"] + [f"  - {{split: {s}, path: {p}}}" for s, p in splits]
    return ("\n".join(lines + ["---", "stand-in"]) + "\n").encode()


@pytest.fixture(scope="module")
def gallery_hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gallery-data")
    h = FakeHub()
    ultrachat = [{"prompt": m[0]["content"], "prompt_id": str(i), "messages": m} for i, m in enumerate(CHAT)]
    h.add("dataset", "HuggingFaceH4/ultrachat_200k", {
        "README.md": _configs(("default", [("train_sft", "data/train_sft-*.parquet"), ("test_sft", "data/test_sft-*.parquet")])),
        "data/train_sft-00000-of-00001.parquet": _parquet(ultrachat, tmp), "data/test_sft-00000-of-00001.parquet": _parquet(ultrachat[:5], tmp)})
    h.add("dataset", "Open-Orca/SlimOrca", {"oo-labeled_correct.gpt4.sharegpt.jsonl": "".join(json.dumps({"conversations": c}) + "\n" for c in SHAREGPT[:200]).encode()})
    h.add("dataset", "HuggingFaceTB/smoltalk", {
        "README.md": _configs(("all", [("train", "data/all/train-*.parquet")]), ("everyday-conversations", [("train", "data/everyday-conversations/train-*.parquet")])),
        "data/all/train-00000-of-00001.parquet": _parquet([{"messages": m, "source": "x"} for m in CHAT], tmp),
        "data/everyday-conversations/train-00000-of-00001.parquet": _parquet([{"messages": m} for m in CHAT[:300]], tmp)})
    h.add("dataset", "teknium/OpenHermes-2.5", {"openhermes2_5.json": json.dumps([{"conversations": c, "source": "x"} for c in SHAREGPT]).encode()})
    imdb = [{"text": f"{'great' if i % 2 else 'awful'} film number {i}", "label": i % 2} for i in range(50)]
    h.add("dataset", "stanfordnlp/imdb", {
        "README.md": _configs(("plain_text", [("train", "plain_text/train-*.parquet"), ("test", "plain_text/test-*.parquet")])),
        "plain_text/train-00000-of-00001.parquet": _parquet(imdb, tmp), "plain_text/test-00000-of-00001.parquet": _parquet(imdb[:10], tmp)})
    yield h
    h.close()


GALLERY = [
    # recipe, stand-in family, what the plan must say
    ("llama-3.1-8b-instruct-lora-zero3.yaml", "llama3.1", ["LlamaForCausalLM", "deepspeed ZeRO-3", "world size 8", "lora         r 16"]),
    ("qwen2.5-7b-full-fsdp2.yaml", "qwen2.5", ["Qwen2ForCausalLM", "fsdp2", "world size 16 (8 per node x 2 nodes)", "75.0% of the mixture"]),
    ("qwen3-0.6b-one-gpu.yaml", "qwen3", ["Qwen3ForCausalLM", "world size 1", "smoltalk[everyday-conversations]:train"]),
    ("mistral-7b-lora.yaml", "mistral", ["MistralForCausalLM", "fsdp2", "world size 4", "OpenHermes-2.5:train: 80 rows"]),
    ("llama-3.1-70b-lora-slurm.yaml", "llama3.1", ["LlamaForCausalLM", "deepspeed ZeRO-3", "world size 32 (8 per node x 4 nodes)"]),
    ("qwen2.5-0.5b-classifier.yaml", "qwen2.5-small", ["Qwen2ForSequenceClassification", "classification of `text` into `label`: 2 classes"]),
]


@pytest.mark.parametrize("recipe, family, expected", GALLERY, ids=[g[0] for g in GALLERY])
def test_gallery_recipe_plans_on_a_stand_in(recipe, family, expected, gallery_hub, tmp_path_factory, tmp_path, cache_dir, monkeypatch):
    from launcher.plan import format_plan, make_plan
    from launcher.recipe import load_recipe

    point_at(monkeypatch, gallery_hub.url, tmp_path_factory.getbasetemp() / "gallery-hf")
    standin = standins.build(family, tmp_path_factory.getbasetemp() / f"standin-{family}")
    r = load_recipe(REPO / "recipes" / recipe, [f"model.path={standin}", f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'run'}"])
    text = format_plan(make_plan(r), r)
    for phrase in expected:
        assert phrase in text, text
