"""Classification end to end: both heads on ddp, fsdp and ZeRO-3, with and without LoRA, on 2 ranks.

Each run trains on a slice of the classify quickstart's data, evaluates at the start and the end,
and exports final/. The metrics must be self-consistent (accuracy, macro-F1 and per-class numbers
recomputed from the logged confusion matrix); fsdp and ZeRO-3 must reproduce ddp's losses for the
same head and LoRA setting; and training must have lowered the eval loss (except for a sequence
head with LoRA: over a frozen, randomly initialised tiny base it learns too slowly to show in a
test's few steps, so there the match with ddp is the check). Then one fresh interpreter that never
imports the launcher classifies the eval file with every exported model, as a user would serve it,
and must reproduce each run's final eval accuracy.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_sft

RECIPE = "recipes/quickstart-classify.yaml"
DATA = REPO / "recipes" / "data" / "quickstart-classify"
ENGINES = {
    "ddp": ["strategy.backend=ddp"],
    "fsdp": ["strategy.backend=fsdp"],
    "zero3": ["strategy.backend=deepspeed", "strategy.zero_stage=3"],
}
MATRIX = [(head, engine, lora) for head in ("lm", "sequence") for engine in ENGINES for lora in (False, True)]
EXPORTS = []  # (final dir, final eval accuracy), filled by the matrix, checked by the last test
LOSSES = {}  # (head, lora) -> ddp's per-step train losses and final eval loss


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A slice of the quickstart data: enough to learn something in a few steps, small enough to be quick."""
    d = tmp_path_factory.mktemp("classify-data")
    for name, n in (("train.jsonl", 160), ("eval.jsonl", 48)):
        lines = (DATA / name).read_text().splitlines()[:n]
        (d / name).write_text("\n".join(lines) + "\n")
    return d


def check_metrics(row: dict) -> None:
    """Every classification number in an eval row follows from its confusion matrix."""
    labels, matrix = row["eval_confusion_matrix"]["labels"], row["eval_confusion_matrix"]["rows_true_columns_predicted"]
    total = sum(map(sum, matrix))
    assert row["eval_accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(labels))) / total)
    f1s = []
    for i, name in enumerate(labels):
        m = row["eval_per_class"][name]
        predicted = sum(r[i] for r in matrix)
        assert m["support"] == sum(matrix[i])
        assert m["precision"] == pytest.approx(matrix[i][i] / predicted if predicted else 0.0)
        assert m["recall"] == pytest.approx(matrix[i][i] / m["support"] if m["support"] else 0.0)
        p, r = m["precision"], m["recall"]
        assert m["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
        if m["support"] or predicted:
            f1s.append(m["f1"])
    assert row["eval_macro_f1"] == pytest.approx(sum(f1s) / len(f1s))


@pytest.mark.parametrize("head,engine,lora", MATRIX, ids=[f"{h}-{e}-{'lora' if lo else 'full'}" for h, e, lo in MATRIX])
def test_classifier_trains_evaluates_and_exports(head, engine, lora, data, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    r = run_sft([
        "run", RECIPE, "--nproc", "2", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}",
        f"data.train_files=[{data / 'train.jsonl'}]", f"data.eval_files=[{data / 'eval.jsonl'}]",
        f"task.head={head}", f"lora.enabled={str(lora).lower()}", "lora.r=8", f"train.lr={8e-3 if lora else 3e-3}",
        "train.micro_batch_size=8", "train.max_steps=20", "train.eval_every=0", "logging.every_steps=2", *ENGINES[engine],
    ])
    assert r.returncode == 0, r.stderr[-4000:]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    assert [e["step"] for e in evals] == [0, 20]
    for e in evals:
        check_metrics(e)
        assert sum(e["eval_per_class"][name]["support"] for name in e["eval_per_class"]) == 48
        assert list(e["eval_per_class"]) == ["food", "sports", "tech", "weather"]  # collected from the data, sorted
    first, last = evals
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    if engine == "ddp":
        LOSSES[head, lora] = (losses, last["eval_loss"])
    elif (head, lora) in LOSSES:
        # The first half of the run: later, float rounding (summation order differs per engine) grows
        # chaotically at these learning rates, so the end is compared only loosely.
        ddp_losses, ddp_eval = LOSSES[head, lora]
        assert losses[:5] == pytest.approx(ddp_losses[:5], rel=1e-3)
        assert last["eval_loss"] == pytest.approx(ddp_eval, rel=0.2)
    if not (head == "sequence" and lora):
        assert last["eval_loss"] < 0.8 * first["eval_loss"], (first["eval_loss"], last["eval_loss"])
    assert "confusion matrix" in r.stderr and f"eval_accuracy: {first['eval_accuracy']:.4f} -> {last['eval_accuracy']:.4f}" in r.stderr

    final = run_dir / "final"
    info = json.loads((final / "classification.json").read_text())
    assert info["head"] == head and info["labels"] == ["food", "sports", "tech", "weather"]
    config = json.loads((final / "config.json").read_text())
    if head == "sequence":
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        assert config["id2label"] == {"0": "food", "1": "sports", "2": "tech", "3": "weather"} and config["label2id"]["tech"] == 2
        assert config["pad_token_id"] is not None
    else:
        assert config["architectures"] == ["LlamaForCausalLM"] and len(info["label_token_ids"]) == 4
    EXPORTS.append((final, last["eval_accuracy"]))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """An encoder saved as a plain `BertModel` (as pretrained encoders are published), with the built-in tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from launcher.builtin import TOKENIZER_DIR

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_an_encoder_takes_a_sequence_head_on_fsdp(data, tiny_bert, tmp_path, cache_dir):
    run_dir = tmp_path / "bert"
    r = run_sft([
        "run", RECIPE, "--nproc", "2", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", f"model.path={tiny_bert}",
        f"data.train_files=[{data / 'train.jsonl'}]", f"data.eval_files=[{data / 'eval.jsonl'}]", "task.head=sequence",
        "strategy.backend=fsdp", "strategy.fsdp_wrap=[BertLayer]", "task.labels=[weather,food,sports,tech]",
        "task.class_weights=[1.0,1.0,2.0,1.0]", "train.lr=3e-3", "train.micro_batch_size=4", "train.max_steps=40", "train.eval_every=0",
    ])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "BertForSequenceClassification" in r.stdout and "class weights [1.0, 1.0, 2.0, 1.0]" in r.stdout
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    for e in evals:
        check_metrics(e)
        assert list(e["eval_per_class"]) == ["weather", "food", "sports", "tech"]  # the listed order
    # A randomly initialised encoder over a byte-level tokenizer learns this task too slowly for a test's
    # 40 steps; what is checked is that it trains, evaluates, exports and serves like the decoders.
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"]["0"] == "weather"
    EXPORTS.append((run_dir / "final", evals[-1]["eval_accuracy"]))


def test_a_run_is_not_continued_when_the_collected_classes_changed(tmp_path, cache_dir):
    train = tmp_path / "train.jsonl"
    rows = [{"text": "rain again", "label": "weather"}, {"text": "fresh bread", "label": "food"}] * 4
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["run", RECIPE, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", f"data.train_files=[{train}]",
            "data.eval_files=[]", "train.eval_at_start=false", "train.eval_every=0", "train.micro_batch_size=2", "export.on_finish=false"]
    r = run_sft(args + ["train.max_steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(train, "a") as f:
        f.write(json.dumps({"text": "new phone", "label": "tech"}) + "\n")
    r = run_sft(args + ["train.max_steps=4"])  # extending the run is allowed; a new class under the same ids is not
    assert r.returncode == 2, r.stderr[-3000:]
    assert "its classes were ['food', 'weather'] and this run's are ['food', 'tech', 'weather']" in r.stderr


def test_exported_classifiers_reproduce_eval_accuracy_in_a_fresh_process(data):
    if not EXPORTS:
        pytest.skip("needs the exports of test_classifier_trains_evaluates_and_exports (run the whole module)")
    script = Path(__file__).parent / "helpers" / "serve_classifier.py"
    out = subprocess.run([sys.executable, str(script), str(data / "eval.jsonl"), *(str(d) for d, _ in EXPORTS)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    served = {row["dir"]: row["accuracy"] for row in map(json.loads, out.stdout.splitlines())}
    for final, accuracy in EXPORTS:
        assert served[str(final)] == pytest.approx(accuracy, abs=1e-9), final
