"""Recipes: merging, overrides, interpolation, errors that name the problem, redaction."""

import pytest

from launcher.errors import RecipeError
from launcher.recipe import load_recipe
from launcher.rundir import to_yaml


@pytest.fixture
def recipes(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: base\nmodel:\n  path: builtin:tiny-llama\ndata:\n  train_files: [a.jsonl]\ntrain:\n  lr: 1.0e-3\n"
        "launch:\n  env:\n    HF_TOKEN: hf_abcdefghijklmnopqrstuvwx\n    WANDB_API_KEY: abc\n    OMP_NUM_THREADS: '2'\n"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\ntrain:\n  max_steps: 10\n")
    return tmp_path


def test_extends_overrides_and_interpolation(recipes):
    r = load_recipe(recipes / "child.yaml", ["train.micro_batch_size=4"])
    assert r.name == "child"
    assert r.output_dir == "runs/child"  # ${name} resolved after the child's override
    assert r.train.lr == 1e-3 and r.train.max_steps == 10 and r.train.micro_batch_size == 4


def test_unknown_key_names_key_and_closest(recipes):
    with pytest.raises(RecipeError, match=r"unknown key `train.lrr`.*Did you mean `train.lr`"):
        load_recipe(recipes / "child.yaml", ["train.lrr=1"])
    (recipes / "typo.yaml").write_text("extends: base.yaml\ntrian:\n  lr: 1\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: unknown key `trian`.*Did you mean `train`"):
        load_recipe(recipes / "typo.yaml")


def test_wrong_type_names_key_and_type(recipes):
    with pytest.raises(RecipeError, match=r"`train.max_steps`.*Integer"):
        load_recipe(recipes / "child.yaml", ["train.max_steps=many"])


def test_yaml_syntax_error_names_file_line_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n   oops: [\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: YAML syntax error at line 3, column 8"):
        load_recipe(bad)


def test_missing_file_and_missing_required(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("name: x\n")
    with pytest.raises(RecipeError, match=r"required key\(s\) not set: .*model.path"):
        load_recipe(tmp_path / "empty.yaml")


def test_bad_values(recipes):
    with pytest.raises(RecipeError, match="data.format: chat"):
        load_recipe(recipes / "child.yaml", ["data.format=chat"])
    with pytest.raises(RecipeError, match="train.lr_scheduler: cosin` is not one of linear, cosine"):
        load_recipe(recipes / "child.yaml", ["train.lr_scheduler=cosin"])
    with pytest.raises(RecipeError, match="float16` with `strategy.backend: fsdp` would train without loss scaling"):
        load_recipe(recipes / "child.yaml", ["model.dtype=float16", "strategy.backend=fsdp"])
    with pytest.raises(RecipeError, match="only one of"):
        load_recipe(recipes / "child.yaml", ["train.gradient_accumulation_steps=2", "train.global_batch_size=8"])


def test_secrets_are_redacted(recipes):
    text = to_yaml(load_recipe(recipes / "child.yaml"))
    assert "hf_abcdefghijklmnopqrstuvwx" not in text and "WANDB_API_KEY: '***REDACTED***'" in text
    assert "OMP_NUM_THREADS: '2'" in text
