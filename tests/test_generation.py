"""Batched, lockstep generation (launcher/generation.py) and exact match in evaluate.py."""

import pytest
import torch

from launcher import generation
from launcher.data.tokenize import tokenize_conversation
from launcher.dist import Dist
from helpers.models import chat_prompt, scrambled

PROMPTS = ["repeat: a b c d", "hi", "repeat: q w e r t y u i o p a s d f", "x y", "tell me a long story about the sea"]


def _load(name, cache_dir):
    return scrambled(name, cache_dir)


def _prompt_ids(tok, text):
    return chat_prompt(tok, [{"role": "user", "content": text}])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_batched_greedy_equals_one_prompt_at_a_time(name, cache_dir):
    model, tok = _load(name, cache_dir)
    prompts = [_prompt_ids(tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 2  # real left padding
    free = generation.generate(model, prompts[:1], 12, tok.pad_token_id, [], "cpu", False)[0]
    # A stop token that one prompt's greedy decode reaches at its 3rd token (and others later or never):
    # that row must end there while the rest of its batch goes on.
    stop = [free[2]]
    alone = [generation.generate(model, [p], 12, tok.pad_token_id, stop, "cpu", False)[0] for p in prompts]
    together = generation.generate(model, prompts, 12, tok.pad_token_id, stop, "cpu", False)
    assert together == alone
    assert len(alone[0]) <= 3 and alone[0][-1] == stop[0]
    assert any(len(r) == 12 for r in alone)  # some rows ran to the limit in the same batch


def test_padding_rows_decode_a_usable_row(cache_dir):
    """Row 0's reply was cut (reply_end == 0) and 3 usable rows over 2 ranks leave rank 1 a padding
    row: it used to decode dataset[0]'s empty prompt and crash."""
    from datasets import Dataset

    from launcher.engines.ddp import DDPEngine
    from launcher.evaluate import evaluate
    from launcher.recipe import TrainConfig

    model, tok = _load("tiny-llama", cache_dir)
    rows = []
    for k, text in enumerate(["a b", "c d e", "f", "g h i j"]):
        enc = tokenize_conversation(tok, [{"role": "user", "content": f"repeat: {text}"}, {"role": "assistant", "content": text}])
        if k == 0:
            enc["reply_start"] = enc["reply_end"] = 0  # as data/prepare.py marks a cut reply
        rows.append(enc)
    dataset = Dataset.from_list(rows)
    engine = DDPEngine.create(model, TrainConfig(), Dist())
    result = evaluate(engine, Dist(rank=1, world_size=2), dataset, 2, tok, generate=10)  # not a process group: rank 1's share alone
    assert result["eval_exact_match"] == 0.0  # an untrained model; the point is that it ran


@torch.no_grad()
def _old_label_scores(model, prompts, completions, pad_id):
    """The scoring this replaced: one full forward per (prompt, label), right-padded."""
    from launcher.data.batches import pad_collate
    from launcher.data.tokenize import IGNORE

    ids = [p + c for p in prompts for c in completions]
    labels = [[IGNORE] * len(p) + c for p in prompts for c in completions]
    batch = pad_collate(ids, labels, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (target != IGNORE)).sum(-1).double().view(len(prompts), len(completions))


def test_labels_scored_over_a_shared_prompt_match_one_forward_per_label(cache_dir):
    from datasets import Dataset

    from launcher.data.classify import Classes, completion_ids
    from launcher.evaluate import _label_scores, _lm_predictions

    model, tok = _load("tiny-llama", cache_dir)
    names = ["yes", "no", "maybe so", "neutral", "good one", "bad"]
    completions = [completion_ids(tok, n) for n in names]
    assert len({len(c) for c in completions}) > 2
    prompts = [_prompt_ids(tok, f"Classify: {p}") for p in PROMPTS]
    new = _label_scores(model, prompts, completions, tok.pad_token_id, "cpu")
    old = _old_label_scores(model, prompts, completions, tok.pad_token_id)
    torch.testing.assert_close(new, old, atol=1e-4, rtol=1e-5)
    assert (new.argmax(-1) == old.argmax(-1)).all() and len(set(old.argmax(-1).tolist())) > 1  # the predictions differ per row
    # Through _lm_predictions, with a padding row (-1) that counts nothing.
    rows = [{"input_ids": p + completions[k % len(names)], "reply_start": len(p), "class_id": k % len(names)} for k, p in enumerate(prompts)]
    classes = Classes(names=names, head="lm", completions=completions, source="test")
    pairs, sums = _lm_predictions(model, Dataset.from_list(rows), [0, 1, 2, 3, 4, -1], 4, tok.pad_token_id, "cpu", classes)
    assert pairs == [(int(old[k].argmax()), r["class_id"]) for k, r in enumerate(rows)]
    true = [r["class_id"] for r in rows]
    assert sums[0] == pytest.approx(-sum(float(old[k, c]) for k, c in enumerate(true)), rel=1e-5)
    assert sums[1] == sum(len(completions[c]) for c in true)


def test_negative_generate_batch_is_a_recipe_error():
    from conftest import REPO
    from launcher.errors import RecipeError
    from launcher.recipe import load_recipe

    with pytest.raises(RecipeError, match="eval_generate_batch_size"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", ["train.eval_generate_batch_size=-1"])
