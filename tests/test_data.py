"""Data: exact label masks, every format, row errors that name file and row, the length policy, caching."""

import json

import pytest

from launcher.builtin import TOKENIZER_DIR
from launcher.data.prepare import prepare
from launcher.data.tokenize import IGNORE, tokenize_completion, tokenize_conversation
from launcher.errors import DataError
from launcher.recipe import DataConfig


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _trained(tok, enc):
    return [(tok.decode([i]), lab != IGNORE) for i, lab in zip(enc["input_ids"], enc["labels"])]


def test_golden_mask_multi_turn(tok):
    """Every assistant turn is trained, each with its closing <|im_end|>; nothing else is."""
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    enc = tokenize_conversation(tok, conv)
    trained = [t for t, on in _trained(tok, enc) if on]
    assert "".join(trained) == "hello<|im_end|>see you<|im_end|>"
    # The full golden sequence (the shipped tokenizer's subwords): which token is trained.
    golden = [
        ("<|im_start|>", 0), ("s", 0), ("y", 0), ("s", 0), ("t", 0), ("e", 0), ("m", 0), ("\n", 0), ("B", 0), ("e", 0), (" b", 0), ("r", 0), ("i", 0), ("e", 0), ("f", 0), (".", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("h", 0), ("i", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("h", 1), ("el", 1), ("l", 1), ("o", 1), ("<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("b", 0), ("y", 0), ("e", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("se", 1), ("e", 1), (" y", 1), ("o", 1), ("u", 1), ("<|im_end|>", 1), ("\n", 0),
    ]
    got = _trained(tok, enc)
    assert [(t, int(on)) for t, on in got] == golden
    # The final reply (for exact-match eval) is "see you<|im_end|>".
    assert tok.decode(enc["input_ids"][enc["reply_start"] : enc["reply_end"]]) == "see you<|im_end|>"


def test_span_masks_by_bisection_match_the_token_by_token_rule():
    """Ordered offsets take the bisection path, others the per-token loop: the same rule either way
    (a token is trained if it overlaps a span, straddling ones included; the last span is the reply)."""
    from launcher.data.tokenize import _mask_spans

    ids = [10, 11, 12, 13, 14, 15]
    spans = [(2, 5), (9, 12)]  # token 1 (1-3) straddles the first span's start; token 5 ends the text
    ordered = [(0, 1), (1, 3), (3, 5), (5, 8), (8, 8), (9, 12)]
    got = _mask_spans(ids, ordered, spans)
    assert got["labels"] == [IGNORE, 11, 12, IGNORE, IGNORE, 15] and (got["reply_start"], got["reply_end"]) == (5, 6)
    unordered = [(0, 1), (3, 5), (1, 3), (5, 8), (8, 8), (9, 12)]  # the loop: same rule, token by token
    got = _mask_spans(ids, unordered, spans)
    assert got["labels"] == [IGNORE, 11, 12, IGNORE, IGNORE, 15] and (got["reply_start"], got["reply_end"]) == (5, 6)
    assert _mask_spans(ids, ordered, [(20, 30)])["labels"] == [IGNORE] * 6


def test_completion_trains_completion_and_eos(tok):
    enc = tokenize_completion(tok, "Q: 2+2?\nA:", " 4")
    trained = [t for t, on in _trained(tok, enc) if on]
    assert trained[-1] == tok.eos_token and "".join(trained[:-1]) == " 4"
    assert not any(on for t, on in _trained(tok, enc)[: len(enc["input_ids"]) - len(trained)])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(tmp_path, tok, rows, **kw):
    path = tmp_path / "d.jsonl"
    if rows is not None:
        _write(path, rows)
    cfg = DataConfig(train_files=[str(path)], **kw)
    return prepare(cfg, tok, tmp_path / "cache", seed=0)


def test_formats(tmp_path, tok):
    p = _prepare(tmp_path, tok, [{"instruction": "Add", "input": "2 and 2", "output": "4"}], format="alpaca")
    row = p.train[0]
    text = tok.decode(row["input_ids"])
    assert "Add\n\n2 and 2" in text and "<|im_start|>assistant\n4<|im_end|>" in text  # chat template used
    p = _prepare(tmp_path, tok, [{"text": "plain text here"}], format="text")
    assert all(lab != IGNORE for lab in p.train[0]["labels"])


@pytest.mark.parametrize(
    "fmt,rows,message",
    [
        ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "a"}], r"d.jsonl, row 2: missing field `output`"),
        ("messages", [{"messages": [{"role": "user", "content": "only a question"}]}], r"row 1: the conversation has no assistant turn"),
        ("messages", [{"messages": [{"role": "robot", "content": "x"}]}], r"row 1: message 0 has role 'robot'"),
        ("completion", [{"prompt": "p", "completion": 3}], r"row 1: field `completion` must be a string"),
    ],
)
def test_row_errors_name_file_and_row(tmp_path, tok, fmt, rows, message):
    with pytest.raises(DataError, match=message):
        _prepare(tmp_path, tok, rows, format=fmt)


def test_too_long_policy_and_counts(tmp_path, tok):
    rows = [{"prompt": "short", "completion": "ok"}, {"prompt": "a long prompt " * 20, "completion": "x " * 40}]
    p = _prepare(tmp_path, tok, rows, format="completion", max_seq_len=24, too_long="drop")
    assert len(p.train) == 1 and p.stats[0].dropped_too_long == 1
    p = _prepare(tmp_path, tok, rows, format="completion", max_seq_len=24, too_long="truncate")
    assert len(p.train) == 1 and p.stats[0].dropped_no_target == 1  # the prompt alone fills 24 tokens
    rows[1] = {"prompt": "p", "completion": "x " * 40}
    p = _prepare(tmp_path, tok, rows, format="completion", max_seq_len=24, too_long="truncate")
    assert len(p.train) == 2 and p.stats[0].truncated == 1 and max(len(r) for r in p.train["input_ids"]) == 24
    with pytest.raises(DataError, match=r"row 2: \d+ tokens is longer than data.max_seq_len=24"):
        _prepare(tmp_path, tok, rows, format="completion", max_seq_len=24, too_long="error")


def test_empty_after_filtering_and_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="No training examples are left"):
        _prepare(tmp_path, tok, [{"prompt": "p " * 50, "completion": "c"}], format="completion", max_seq_len=8, too_long="drop")
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        prepare(DataConfig(train_files=[str(tmp_path / "nope.jsonl")]), tok, tmp_path / "cache", seed=0)


def test_tokenized_once_then_cached(tmp_path, tok):
    rows = [{"text": f"row {i}"} for i in range(10)]
    first = _prepare(tmp_path, tok, rows, format="text")
    cached = list((tmp_path / "cache" / "tokenized").glob("*.arrow"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = _prepare(tmp_path, tok, None, format="text")  # same file, tokenizer, settings: cache hit
    assert cached[0].stat().st_mtime_ns == mtime and second.train["input_ids"] == first.train["input_ids"]
    _prepare(tmp_path, tok, None, format="text", max_seq_len=99)  # a different setting: a new cache file
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 2


def test_an_edit_that_keeps_size_and_mtime_is_tokenized_again(tmp_path, tok, monkeypatch):
    """`cp -p` / `rsync -a` of an edited file keep size and mtime: the cache is keyed by content."""
    import os

    from launcher.data import digest

    path = tmp_path / "d.jsonl"
    _write(path, [{"text": "just written"}])
    digest.file_digest(str(path), tmp_path / "cache")
    assert not (tmp_path / "cache" / "digests").exists()  # changed under RACY_S ago: hashed, not remembered
    monkeypatch.setattr(digest, "RACY_S", 0.0)  # remember digests of files written just now, as of older files
    first = _prepare(tmp_path, tok, [{"text": "row one"}, {"text": "row two"}], format="text")
    memo = list((tmp_path / "cache" / "digests").glob("*.json"))
    assert len(memo) == 1 and json.loads(memo[0].read_text())["digest"] == first.stats[0].digest
    st = path.stat()
    path.write_text(path.read_text().replace("one", "six"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = _prepare(tmp_path, tok, None, format="text")
    assert second.stats[0].digest != first.stats[0].digest
    assert tok.decode(second.train[0]["input_ids"]).startswith("row six")
    assert second.train["input_ids"][1] == first.train["input_ids"][1]


def test_eval_fraction_is_held_out(tmp_path, tok):
    rows = [{"text": f"row {i}"} for i in range(20)]
    p = _prepare(tmp_path, tok, rows, format="text", eval_fraction=0.25)
    assert len(p.train) == 15 and len(p.eval) == 5
    assert not set(map(tuple, p.train["input_ids"])) & set(map(tuple, p.eval["input_ids"]))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_parquet_csv_and_json_files(tmp_path, tok, suffix):
    from datasets import Dataset

    rows = {"prompt": ["2+2=", "3+3="], "completion": [" 4", " 6"]}
    path = tmp_path / f"d{suffix}"
    ds = Dataset.from_dict(rows)
    {".parquet": ds.to_parquet, ".csv": ds.to_csv, ".json": lambda p: ds.to_json(p, lines=False)}[suffix](str(path))
    p = prepare(DataConfig(train_files=[str(path)], format="completion"), tok, tmp_path / "cache", seed=0)
    assert len(p.train) == 2 and tok.decode(p.train[1]["input_ids"]).endswith("3+3= 6" + tok.eos_token)


def test_parallel_tokenization_gives_the_same_rows_and_row_errors(tmp_path, tok):
    """data.num_proc: batched tokenization in worker processes, row for row as in one process."""
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a " * (i % 7 + 1)}]} for i in range(40)]
    one = _prepare(tmp_path, tok, rows, num_proc=1)
    path = tmp_path / "d.jsonl"
    two = prepare(DataConfig(train_files=[str(path)], num_proc=2), tok, tmp_path / "cache2", seed=0)
    assert two.train["input_ids"] == one.train["input_ids"] and two.train["labels"] == one.train["labels"]
    assert two.train["input_ids"][3] == tokenize_conversation(tok, rows[3]["messages"])["input_ids"]
    bad = rows + [{"messages": [{"role": "robot", "content": "x"}]}]
    _write(path, bad)
    with pytest.raises(DataError, match=r"row 41: message 0 has role 'robot'"):
        prepare(DataConfig(train_files=[str(path)], num_proc=2), tok, tmp_path / "cache3", seed=0)


def test_data_is_tokenized_once_per_shared_cache_and_once_per_node_local_cache(tmp_path):
    """Two real processes (two nodes' launchers) start tokenizing the same file at once: into a shared
    cache, one tokenizes and the other waits for the lock and reads its Arrow file; into node-local
    caches, each tokenizes its own once."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO

    data = tmp_path / "train.jsonl"
    data.write_text("".join((REPO / "recipes/data/quickstart/train.jsonl").read_text().splitlines(keepends=True)[:60]))
    rows = len(data.read_text().splitlines())
    shared, local_a, local_b, go = tmp_path / "shared", tmp_path / "node-a", tmp_path / "node-b", tmp_path / "go"
    helper = REPO / "tests/helpers/prepare_once.py"
    procs = [subprocess.Popen([sys.executable, str(helper), str(data), str(go), str(tmp_path / f"{n}.json"), str(shared), str(local)],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
             for n, local in (("a", local_a), ("b", local_b))]
    while not all((tmp_path / f"{n}.json.ready").exists() for n in "ab") and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    counts = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab"]
    assert sorted(c[str(shared)] for c in counts) == [0, rows]  # one process tokenized, the other read its cache
    assert counts[0][str(local_a)] == rows and counts[1][str(local_b)] == rows
    assert [p.name for p in (shared / "tokenized").iterdir() if p.suffix == ".arrow"] and not list((shared / "tokenized").glob("tmp*"))
