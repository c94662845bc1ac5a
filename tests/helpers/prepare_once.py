"""One process (a rank, or another node's launcher) preparing data: `prepare_once.py DATA GO OUT CACHE [CACHE ...]`.

Writes OUT.ready, then waits for the file GO (so the test's processes start tokenizing together), prepares DATA
into each CACHE in turn and writes OUT: {cache: rows this process tokenized itself}. A row taking
10 ms keeps the tokenizing window open long enough for a second process to walk into it."""

import json
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from launcher.builtin import TOKENIZER_DIR
from launcher.data import prepare as prep
from launcher.recipe import DataConfig

data, go, out, *caches = sys.argv[1:]
counts = {}
current = [None]
original = prep._tokenize_fn


def counting_tokenize_fn(*args, **kwargs):
    fn = original(*args, **kwargs)

    def counted(rows, indices):  # a batched map: a batch of rows at a time
        counts[current[0]] = counts.get(current[0], 0) + len(indices)
        time.sleep(0.01 * len(indices))
        return fn(rows, indices)

    return counted


prep._tokenize_fn = counting_tokenize_fn
tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
cfg = DataConfig(train_files=[data], eval_fraction=0.0)
Path(out + ".ready").touch()  # imports done: the test says go when every process is here
while not Path(go).exists():
    time.sleep(0.01)
for cache in caches:
    current[0] = cache
    counts.setdefault(cache, 0)
    prepared = prep.prepare(cfg, tok, Path(cache), seed=0)
    assert len(prepared.train) > 0
Path(out).write_text(json.dumps(counts))
