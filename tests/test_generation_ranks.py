"""Exact match by generation on 2 real ranks under ddp, fsdp and ZeRO-3: no hang, the same numbers.

The model (see _stopping_model) ends some replies with its end-of-turn token after a few tokens
and never ends others, so the ranks' rows stop after very different numbers of tokens: the case
that deadlocked ZeRO-3.
"""

import json
import subprocess

import pytest
import torch

from conftest import run_sft
from helpers.models import chat_prompt, scrambled
from launcher.data.tokenize import tokenize_conversation

QUICKSTART = "recipes/quickstart.yaml"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _conv(user, reply):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})


def _stopping_model(cache_dir):
    """The scrambled tiny Llama with the embedding rows of <|im_end|> and one other token swapped (a
    relabelling: the tied weights move together), chosen so that some prompts now end their reply
    with <|im_end|> after a few tokens and others never do. Returns (model, tok, users, hits, runs):
    `hits` are (user, reply text) pairs the model answers exactly, `runs` users it never stops for."""
    from collections import Counter

    from launcher import generation

    model, tok = scrambled("tiny-llama", cache_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    users = [f"repeat: {' '.join(LETTERS[k:k + 3])}" for k in range(12)]
    prompts = [chat_prompt(tok, [{"role": "user", "content": u}]) for u in users]
    early = Counter(t for row in generation.generate(model, prompts, 4, tok.pad_token_id, [], "cpu", False) for t in row[:3])
    emb = model.get_input_embeddings().weight
    for other, _ in early.most_common(8):
        with torch.no_grad():
            emb[[other, end]] = emb[[end, other]]
        hits, runs = [], []
        for u, p, out in zip(users, prompts, generation.generate(model, prompts, 16, tok.pad_token_id, [end], "cpu", False)):
            if out[-1] != end:
                runs.append(u)
            elif len(out) >= 2:  # a reply needs content; check it tokenizes back to what was generated
                enc = tokenize_conversation(tok, [{"role": "user", "content": u}, {"role": "assistant", "content": tok.decode(out[:-1])}])
                if enc["input_ids"][: enc["reply_start"]] == p and enc["input_ids"][enc["reply_start"] : enc["reply_end"]] == out:
                    hits.append((u, tok.decode(out[:-1])))
        if len(hits) >= 2 and len(runs) >= 5:
            return model, tok, hits, runs
        with torch.no_grad():
            emb[[other, end]] = emb[[end, other]]  # undo; try the next token
    raise AssertionError("no token swap gives both early stops and endless replies")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("lockstep")
    model, tok, hits, runs = _stopping_model(cache_dir)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    # Replies the model stops on after a few tokens (hits), and ones it never ends (runs to the
    # limit, 2 to ~50 tokens). Row 1 is cut at max_seq_len (reply_end == 0), and an odd number of
    # usable rows leaves rank 1 a padding row.
    replies = ["k", " ".join(LETTERS) * 2, "a b c d", " ".join(LETTERS), "z"]
    rows = hits + list(zip(runs, replies))
    if len(rows) % 2 == 0:
        rows = rows[:-1]
    lines = [_conv("repeat: everything", " ".join(LETTERS) * 4)] + [_conv(u, r) for u, r in rows]
    (root / "eval.jsonl").write_text("\n".join(lines) + "\n")
    return root, len(hits) / len(rows)


def _eval(root, backend, cache_dir, *extra):
    run_dir = root / backend.replace("=", "-")
    args = ["run", QUICKSTART, "--nproc", "2", f"output_dir={run_dir}", f"data.cache_dir={cache_dir}", f"model.path={root / 'model'}",
            f"data.train_files=[{root / 'eval.jsonl'}]", f"data.eval_files=[{root / 'eval.jsonl'}]", "data.max_seq_len=80",
            "train.max_steps=1", "train.micro_batch_size=2", "train.lr=1e-12", "train.eval_at_start=false", "train.eval_generate=50",
            "export.on_finish=false", "checkpoint.every_minutes=0", "launch.collective_timeout_s=120", *backend.split(), *extra]
    try:
        proc = run_sft(args, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{backend}: the run hung at evaluation")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_exact_match" in r][-1]


@pytest.mark.slow
def test_sharded_engines_generate_in_lockstep_and_agree_with_ddp(model_and_data, cache_dir):
    """`expected` is the fixture's own single-process decode of the same model: what a ddp run reports."""
    root, expected = model_and_data
    assert expected > 0
    fsdp = _eval(root, "strategy.backend=fsdp", cache_dir)
    zero3 = _eval(root, "strategy.backend=deepspeed strategy.zero_stage=3", cache_dir)
    assert fsdp["eval_exact_match"] == zero3["eval_exact_match"] == pytest.approx(expected)
    assert abs(fsdp["eval_loss"] - zero3["eval_loss"]) < 1e-4
    # LoRA on fsdp: the root unit is peft's wrapper, whose generate bypasses the root's forward
    # (it crashed with "mixed torch.Tensor and DTensor"). Fresh adapters (B = 0) leave the model as it was.
    lora = _eval(root, "strategy.backend=fsdp lora.enabled=true", cache_dir)
    assert lora["eval_exact_match"] == pytest.approx(expected)
    assert abs(lora["eval_loss"] - fsdp["eval_loss"]) < 1e-4
