"""Load local data files with `datasets`, tokenize them once, cache the result.

The cache key is our own fingerprint (file content, format, tokenizer, length policy),
so every rank and every rerun computes the same cache file name: the first process to
get there tokenizes, the others load the Arrow file. `sft run` prepares the data in the
launcher before any worker starts, so row errors surface there and workers only read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import datasets
import torch
from datasets import Dataset, concatenate_datasets
from filelock import FileLock

from launcher.data import classify, sources
from launcher.data.digest import file_digest
from launcher.data.formats import to_example
from launcher.data.stats import row_lengths
from launcher.data.tokenize import TemplateError, assistant_spans, tokenize_completion, tokenize_rendered, too_long_status
from launcher.errors import DataError
from launcher.recipe import DataConfig

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Part of every fingerprint: bump when tokenization changes so old caches are not reused.
TOKENIZATION_VERSION = 2


@dataclass
class FileStats:
    file: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    target_tokens: int = 0
    digest: str = ""  # the file's content (data/digest.py): checkpoints record it, a resume compares it
    lengths: Optional[object] = field(default=None, repr=False, compare=False)  # numpy: tokens of each kept row (the plan's statistics)


@dataclass
class Prepared:
    train: Dataset
    eval: Optional[Dataset]
    stats: List[FileStats] = field(default_factory=list)
    # task.type classification: the label set (and the lm head's label tokens)
    classes: Optional[classify.Classes] = None
    # each training source's rows, tokens and share of the mixture (data/sources.py)
    mixture: list = field(default_factory=list)


def read_rows(path: str, cache: Path) -> tuple:
    """The file's rows and its content digest."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Data file {path} does not exist. Fix the path in `data.train_files` / `data.eval_files` (relative paths are relative to the directory you run from).")
    builder = BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"Data file {path}: unsupported extension {p.suffix!r}; use one of {', '.join(BUILDERS)}.")
    if p.stat().st_size == 0:
        raise DataError(f"Data file {path} is empty (0 bytes). Fill it with rows or remove it from `data.train_files` / `data.eval_files`.")
    digest = file_digest(path, cache)
    # datasets keys its own cache of the parsed rows by path and mtime only: one cache per content.
    rows_cache = cache / "datasets" / digest.replace(":", "-")
    try:
        as_text = _csv_as_text(p) if builder == "csv" else {}
        ds = datasets.load_dataset(builder, data_files=str(p.resolve()), split="train", cache_dir=str(rows_cache), **as_text)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for malformed files, some with no message
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300].rstrip(".")
        if "corresponds to no data" in why:
            raise DataError(f"Data file {path} has no rows (only blank lines). Add rows, one JSON object per line.") from None
        while e.__cause__ is not None or e.__context__ is not None:  # datasets wraps the parser's error
            e = e.__cause__ or e.__context__
            why = (str(e).strip().splitlines() or [why])[0][:300].rstrip(".")
        if builder == "json" and p.suffix.lower() == ".jsonl":
            why = _bad_json_line(p) or why
        fix = "that it is a complete Parquet file" if builder == "parquet" else f"that every line is valid {builder.upper()} in UTF-8"
        raise DataError(f"Data file {path} could not be read as {builder}: {why}. Check {fix}.") from None
    if len(ds) == 0:
        raise DataError(f"Data file {path} has no rows.")
    return ds, digest


def _csv_as_text(path: Path) -> dict:
    """CSV cells are text: type inference would turn an answer like "4" into an int, and "" into NaN."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if next(reader, None) is None:
            raise DataError(f"Data file {path} has a header line ({', '.join(header)[:200]}) but no rows. Add rows below it.")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def _bad_json_line(path: Path) -> str:
    """The first line of a JSON Lines file that is not a JSON value (the parser counts rows per block, not lines)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"line {number} is not valid JSON ({e})"
    return ""


def _bad_utf8(path: str) -> str:
    """Where a file stops being UTF-8: its line, for the message."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"line {line} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})"
    return "it is not UTF-8 text"


def tokenizer_signature(tokenizer) -> str:
    parts = [tokenizer.backend_tokenizer.to_str(), str(tokenizer.chat_template), str(tokenizer.eos_token_id), str(tokenizer.bos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def fingerprint(digest: str, cfg: DataConfig, tokenizer, is_eval: bool, classes: Optional[classify.Classes] = None, task=None, extra: Optional[str] = None) -> str:
    key = [digest, cfg.format, cfg.max_seq_len, cfg.too_long, is_eval, tokenizer_signature(tokenizer), TOKENIZATION_VERSION]
    if extra is not None:  # a source's subset, split and column mapping (data/sources.py)
        key.append(extra)
    if classes is not None:
        key += [classes.names, classes.head, task.text_field, task.label_field, task.prompt]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]


def _tokenize_fn(cfg: DataConfig, tokenizer, file: str, too_long: str):
    """A batched map function: chat templates are rendered row by row, their texts tokenized together."""
    has_template = bool(tokenizer.chat_template)

    def finish(enc: Dict, index: int) -> Dict:
        status = "ok"
        if len(enc["input_ids"]) > cfg.max_seq_len:
            status = too_long_status(file, index, len(enc["input_ids"]), cfg.max_seq_len, too_long)
            for k in ("input_ids", "labels"):
                enc[k] = enc[k][: cfg.max_seq_len]
            if enc["reply_end"] > cfg.max_seq_len:
                enc["reply_start"] = enc["reply_end"] = 0  # the final reply is cut: not usable for generation
        targets = enc["labels"][1:]
        n_targets = len(targets) - targets.count(-100)
        if status != "dropped_too_long" and n_targets == 0:
            status = "dropped_no_target"
        return {**enc, "status": status, "n_targets": n_targets}

    def fn(rows: Dict[str, list], indices: List[int]) -> Dict[str, list]:
        encs: List[Optional[Dict]] = [None] * len(indices)
        rendered = []
        for j, index in enumerate(indices):
            example = to_example(cfg.format, {k: v[j] for k, v in rows.items()}, file, index, has_template)
            if "messages" in example:
                try:
                    rendered.append((j, assistant_spans(tokenizer, example["messages"], example.get("tools"))))
                except TemplateError as e:
                    raise DataError(f"{file}, row {index + 1}: {e}.") from None
            else:
                encs[j] = tokenize_completion(tokenizer, example["prompt"], example["completion"])
        for (j, _), enc in zip(rendered, tokenize_rendered(tokenizer, [r for _, r in rendered])):
            encs[j] = enc
        done = [finish(enc, index) for enc, index in zip(encs, indices)]
        return {k: [d[k] for d in done] for k in done[0]}

    return fn


def _classify_fn(cfg: DataConfig, task, tokenizer, classes: classify.Classes, file: str, too_long: str):
    def fn(rows: Dict[str, list], indices: List[int]) -> Dict[str, list]:
        done = [classify.tokenize_row({k: v[j] for k, v in rows.items()}, index, file, task, tokenizer, classes, cfg.max_seq_len, too_long)
                for j, index in enumerate(indices)]
        return {k: [d[k] for d in done] for k in done[0]}

    return fn


def _num_proc(cfg: DataConfig, rows: int) -> Optional[int]:
    """data.num_proc, or (unset) one process per core for files big enough to repay starting them."""
    if cfg.num_proc is not None:
        return cfg.num_proc if cfg.num_proc > 1 else None
    return min(os.cpu_count() or 1, 16) if rows >= 20_000 and (os.cpu_count() or 1) > 1 else None


def tokenize_file(path: str, raw: Dataset, digest: str, cfg: DataConfig, tokenizer, cache: Path, is_eval: bool = False, classes=None, task=None,
                  source=None) -> tuple:
    """`raw`, `digest`: the file's rows and content (read_rows). `source`: a data/sources.Source (its label names the rows in messages)."""
    fp = fingerprint(digest, cfg, tokenizer, is_eval, classes, task, source.key if source else None)
    label = source.label if source else path
    cache_file = cache / "tokenized" / f"{fp}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Eval data is truncated rather than dropped or rejected: it is measured, not trained on.
    too_long = "truncate" if is_eval and cfg.too_long == "drop" else cfg.too_long
    if classes is not None:
        fn = _classify_fn(cfg, task, tokenizer, classes, label, too_long)
    else:
        fn = _tokenize_fn(cfg, tokenizer, label, too_long)
    # One process tokenizes each cache entry: the others (ranks, and nodes sharing the cache) wait here
    # and then load its Arrow file, which datasets writes under a temp name and renames into place.
    try:
        with FileLock(str(cache_file) + ".lock"):
            ds = raw.map(
                fn,
                with_indices=True,
                batched=True,
                batch_size=256,
                num_proc=_num_proc(cfg, len(raw)),
                remove_columns=raw.column_names,
                cache_file_name=str(cache_file),
                new_fingerprint=fp,
                desc=f"tokenizing {Path(label).name}",
            )
    except UnicodeDecodeError:  # pyarrow's JSON reader passes invalid UTF-8 through; reading a row fails
        raise DataError(f"Data file {path}: {_bad_utf8(path)}. Save the file as UTF-8.") from None
    counts = Counter(ds["status"])
    kept = ds.filter(lambda s: s in ("ok", "truncated"), input_columns="status", keep_in_memory=True)
    stats = FileStats(
        file=label,
        rows=len(ds),
        kept=len(kept),
        truncated=counts.get("truncated", 0),
        dropped_too_long=counts.get("dropped_too_long", 0),
        dropped_no_target=counts.get("dropped_no_target", 0),
        target_tokens=int(sum(kept["n_targets"])),
        digest=digest,
        lengths=row_lengths(kept),
    )
    return kept, stats


def prepare(cfg: DataConfig, tokenizer, cache: Path, seed: int, task=None) -> Prepared:
    """`task`: the recipe's task section; classification rows need it (sft ignores it)."""
    train_rows = sources.load(cfg, cache, read_rows)  # a file listed twice counts twice
    classes = None
    if task is not None and task.type == "classification":
        classes = classify.make_classes(task, tokenizer, classify.collect_labels(task, {src.label: raw for src, raw in train_rows}))
    parts, stats = [], []
    for src, raw in train_rows:
        ds, st = tokenize_file(src.file, raw, src.digest, sources.data_config(cfg, src), tokenizer, cache, classes=classes, task=task, source=src)
        parts.append(ds)
        stats.append(st)
    train, mixture = sources.mix(parts, [src for src, _ in train_rows], seed)
    eval_ds = None
    if cfg.eval_files:
        eval_parts = []
        for path in cfg.eval_files:
            ds, st = tokenize_file(path, *read_rows(path, cache), cfg, tokenizer, cache, is_eval=True, classes=classes, task=task)
            eval_parts.append(ds)
            stats.append(st)
        eval_ds = concatenate_datasets(eval_parts) if len(eval_parts) > 1 else eval_parts[0]
    elif cfg.eval_fraction > 0 and len(train) > 1:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, round(cfg.eval_fraction * len(train)))
        eval_ds = train.select(sorted(order[:n_eval]), keep_in_memory=True)
        train = train.select(sorted(order[n_eval:]), keep_in_memory=True)
    if len(train) == 0:
        detail = "; ".join(f"{s.file}: {s.rows} rows, {s.dropped_too_long} too long, {s.dropped_no_target} with no target tokens" for s in stats)
        raise DataError(f"No training examples are left after filtering ({detail}). Raise data.max_seq_len or use data.too_long=truncate.")
    return Prepared(train=train, eval=eval_ds if eval_ds is not None and len(eval_ds) else None, stats=stats, classes=classes, mixture=mixture)


def data_files(stats: List[FileStats]) -> Dict[str, str]:
    """{path as in the recipe: content digest} of every file read: what a checkpoint records."""
    return {s.file: s.digest for s in stats}
