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
