"""`sft generate` and `sft chat` on a real exported-model directory (a tiny model saved locally)."""

import json
import os
import select
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_sft
from helpers.models import chat_prompt, scrambled
from launcher.cli import main

MAX_NEW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("generate") / "model"
    m, tok = scrambled("tiny-llama", cache_dir, out)
    return out, m, tok


def _plain_greedy(m, tok, ids):
    """What plain transformers generate gives for one prompt, greedy, with the model's stop tokens."""
    out = m.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_generate_equals_plain_transformers_generate(model, tmp_path):
    path, m, tok = model
    rows = [
        {"messages": [{"role": "user", "content": "repeat: a b c d"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "tell me about the long long sea"}]},
        {"prompt": "Once upon a time", "id": 7},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "the reference, not in the prompt"}]},
        {"prompt": "q"},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "replies.jsonl"
    proc = run_sft(["generate", str(path), "--prompts", str(prompts), "--out", str(out), "--batch-size", "3", "--max-new-tokens", str(MAX_NEW)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k != "reply"} for w in written] == rows  # input rows kept, in order
    for row, w in zip(rows, written):
        if "prompt" in row:
            ids = tok(row["prompt"])["input_ids"]
        else:
            msgs = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
            ids = chat_prompt(tok, msgs)
        assert w["reply"] == _plain_greedy(m, tok, ids), row


def _read_until(fd, marker, seen, timeout=120):
    end = time.time() + timeout
    while marker not in seen[-1]:
        assert time.time() < end, f"no {marker!r} in the chat's output:\n{seen[-1]}"
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            seen[-1] += os.read(fd, 4096).decode(errors="replace").replace("\r\n", "\n")


def test_chat_answers_two_turns_in_a_terminal(model):
    path, m, tok = model
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "chat", str(path), "--max-new-tokens", str(MAX_NEW)],
                            cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = [""]
    try:
        messages = []
        for turn, text in enumerate(["hello there", "and a second question"]):
            _read_until(master, "you> ", seen)
            seen.append("")
            os.write(master, (text + "\n").encode())
            messages.append({"role": "user", "content": text})
            expected = _plain_greedy(m, tok, chat_prompt(tok, messages))
            _read_until(master, "you> ", seen)
            assert f"assistant> {expected}\n" in seen[-1], (turn, expected, seen[-1])
            messages.append({"role": "assistant", "content": expected})
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_bad_input_is_one_paragraph_and_exit_2(model, tmp_path, capsys):
    path, _, _ = model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "neither"}\n')
    assert main(["generate", str(path), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}, row 2" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: x\n")
    assert main(["chat", str(run)]) == 2
    err = capsys.readouterr().err
    assert "without final/" in err and f"sft export {run} --out {run / 'final'}" in err
    plain = tmp_path / "no-template"
    _, tok = scrambled("tiny-llama", tmp_path / "cache", plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    good = tmp_path / "messages.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["generate", str(plain), "--prompts", str(good), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and '{"prompt": "..."}' in err and "Traceback" not in err
