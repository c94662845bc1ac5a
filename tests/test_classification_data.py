"""Classification data and metrics in one process: what each head trains on, truncation, the
metrics' arithmetic, class weights, and bad input stopped before training with file and row named."""

import copy
import json

import pytest
import torch

from conftest import run_sft
from launcher.builtin import TOKENIZER_DIR
from launcher.data.classify import prompt_ids
from launcher.data.prepare import prepare
from launcher.data.tokenize import IGNORE
from launcher.errors import DataError, RecipeError
from launcher.evaluate import classification_metrics
from launcher.recipe import DataConfig, TaskConfig, load_recipe

RECIPE = "recipes/quickstart-classify.yaml"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _prepare(tmp_path, tok, rows, task=None, eval_rows=None, **data):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_files = []
    if eval_rows is not None:
        (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
        eval_files = [str(tmp_path / "eval.jsonl")]
    cfg = DataConfig(train_files=[str(train)], eval_files=eval_files, **data)
    return prepare(cfg, tok, tmp_path / "cache", seed=0, task=task or TaskConfig(type="classification"))


ROWS = [{"text": "the striker scored", "label": "sports"}, {"text": "rain tonight", "label": "weather"}, {"text": "fresh bread", "label": 7}]


def test_lm_head_trains_only_the_label_and_its_end_of_turn(tmp_path, tok):
    task = TaskConfig(type="classification", head="lm", prompt="Topic? {text}")
    p = _prepare(tmp_path, tok, ROWS, task=task)
    assert p.classes.names == ["7", "sports", "weather"]  # integers become strings; numbers sort first
    row = p.train[0]
    trained = [tok.decode([i]) for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE]
    assert "".join(trained) == "sports<|im_end|>"
    # The prompt is exactly what a server gets from the chat template, and the label follows it.
    served = tok.apply_chat_template([{"role": "user", "content": "Topic? the striker scored"}], add_generation_prompt=True, tokenize=False)
    assert row["input_ids"][: row["reply_start"]] == tok(served, add_special_tokens=False)["input_ids"]
    assert row["input_ids"][row["reply_start"]:] == p.classes.completions[row["class_id"]]
    assert len({tuple(c) for c in p.classes.completions}) == 3


def test_lm_head_truncation_cuts_the_text_and_keeps_template_and_label(tmp_path, tok):
    task = TaskConfig(type="classification", head="lm", prompt="Topic? {text}")
    rows = [{"text": "word " * 200, "label": "a"}, {"text": "short", "label": "b"}]
    p = _prepare(tmp_path, tok, rows, task=task, max_seq_len=48)
    row = p.train[0]
    assert len(row["input_ids"]) <= 48 and p.stats[0].truncated == 1
    assert tok.decode(row["input_ids"][row["reply_start"]:]) == "a<|im_end|>"
    assert tok.decode(row["input_ids"][: row["reply_start"]]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(DataError, match=r"train.jsonl, row 1: \d+ tokens is longer than data.max_seq_len=48"):
        _prepare(tmp_path, tok, rows, task=task, max_seq_len=48, too_long="error")


def test_sequence_head_rows_and_truncation(tmp_path, tok):
    task = TaskConfig(type="classification", head="sequence", labels=["sports", "weather", "7"], class_weights=[1.0, 2.0, 3.0])
    p = _prepare(tmp_path, tok, ROWS + [{"text": "x " * 300, "label": "weather"}], task=task, max_seq_len=32)
    assert p.classes.names == ["sports", "weather", "7"] and p.classes.weights == [1.0, 2.0, 3.0]  # listed order is kept
    assert p.train[0]["input_ids"] == tok("the striker scored")["input_ids"] and p.train[2]["class_id"] == 2
    assert "labels" not in p.train.column_names and len(p.train[3]["input_ids"]) == 32


def test_class_weights_give_torch_weighted_cross_entropy():
    from launcher.data.batches import collate
    from launcher.train import class_loss_sum, target_count

    logits = torch.randn(5, 3)
    rows = {"input_ids": [[1, 2]] * 5, "class_id": [0, 2, 1, 2, IGNORE]}  # the last row is padding
    batch = collate(rows, pad_id=0, class_weights=[0.5, 1.0, 3.0])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})

    expected = torch.nn.functional.cross_entropy(logits[:4], torch.tensor([0, 2, 1, 2]), weight=torch.tensor([0.5, 1.0, 3.0]))
    assert float(class_loss_sum(Fixed(), batch) / target_count(batch)) == pytest.approx(float(expected), rel=1e-6)


def test_metrics_from_a_confusion_matrix():
    # rows: true a, b, c; columns: predicted. c never occurs and is never predicted.
    m = classification_metrics(torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert m["eval_accuracy"] == pytest.approx(0.7)
    a, b = m["eval_per_class"]["a"], m["eval_per_class"]["b"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(0.6), pytest.approx(0.75), 4)
    assert (b["precision"], b["recall"], b["support"]) == (pytest.approx(0.8), pytest.approx(4 / 6), 6)
    f1a, f1b = 2 * 0.6 * 0.75 / 1.35, 2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)
    assert m["eval_macro_f1"] == pytest.approx((f1a + f1b) / 2)  # c is in neither the labels nor the predictions
    assert m["eval_confusion_matrix"] == {"labels": ["a", "b", "c"], "rows_true_columns_predicted": [[3, 1, 0], [2, 4, 0], [0, 0, 0]]}


def test_bad_rows_name_file_and_row(tmp_path, tok):
    listed = TaskConfig(type="classification", labels=["sports", "weather"])
    with pytest.raises(DataError, match=r"train.jsonl, row 3: label '7' is not one of task.labels \(sports, weather\)"):
        _prepare(tmp_path, tok, ROWS, task=listed)
    with pytest.raises(DataError, match=r"eval.jsonl, row 2: label 'food' is not one of the labels found in the training files"):
        _prepare(tmp_path, tok, ROWS, eval_rows=[ROWS[0], {"text": "soup", "label": "food"}])
    with pytest.raises(DataError, match=r"train.jsonl, row 2: missing field `text` \(task.text_field\)"):
        _prepare(tmp_path, tok, [ROWS[0], {"body": "rain", "label": "weather"}, ROWS[2]])
    with pytest.raises(DataError, match=r"train.jsonl, row 2: missing field `label` \(task.label_field\)"):
        _prepare(tmp_path, tok, [ROWS[0], {"text": "rain", "label": None}])
    with pytest.raises(DataError, match=r"train.jsonl, row 1: missing field `topic` \(task.label_field\); the file's fields are text, label"):
        _prepare(tmp_path, tok, ROWS, task=TaskConfig(type="classification", label_field="topic"))
    with pytest.raises(DataError, match=r"every training row of .*train.jsonl has the label 'sports'.*at least two classes"):
        _prepare(tmp_path, tok, [ROWS[0], ROWS[0]])


def test_labels_that_tokenize_alike_are_refused_for_the_lm_head(tmp_path, tok):
    trimming = copy.deepcopy(tok)  # a template that trims replies, as many do: "yes" and "yes " become one answer
    trimming.chat_template = tok.chat_template.replace("message['content'] + '<|im_end|>' }}{% endgeneration", "message['content'] | trim + '<|im_end|>' }}{% endgeneration")
    task = TaskConfig(type="classification", head="lm", labels=["yes", "yes ", "no"])
    with pytest.raises(DataError, match=r"task.labels: 'yes' and 'yes ' tokenize to the same tokens .* use task.head: sequence"):
        _prepare(tmp_path, trimming, [{"text": "t", "label": "yes"}], task=task)
    assert prompt_ids(trimming, task, ["yes", "no"], "t")  # the template itself is fine


@pytest.mark.parametrize("override,message", [
    ("task.labels=[only]", "`task.labels` has a single class ('only'); classification needs at least two"),
    ("task.labels=[a,b,a]", "`task.labels` lists 'a' more than once"),
    ("task.prompt='Say {txt}'", "`task.prompt` is not a valid template (KeyError: 'txt')"),
    ("task.prompt=Classify", "`task.prompt` has no {text} placeholder"),
    ("task.class_weights=[1.0,2.0]", "`task.class_weights` is for `task.head: sequence`"),
    ("train.eval_generate=4", "`train.eval_generate` is for sft"),
])
def test_bad_recipes_are_refused(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, [override])
    assert message in str(e.value)


def test_bad_label_stops_sft_run_before_any_worker(tmp_path, cache_dir):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    r = run_sft(["run", RECIPE, "--nproc", "2", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
                 f"data.train_files=[{train}]", "data.eval_files=[]", "train.eval_at_start=false", "train.eval_every=0", "task.labels=[sports,weather]"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: {train}, row 3: label '7' is not one of task.labels (sports, weather)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "logs").exists()
