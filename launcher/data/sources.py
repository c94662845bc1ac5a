"""Training data sources: local files and Hub datasets, each with its format, columns and share.

`data.train_files` are sources too (every row, in data.format). A Hub dataset is downloaded as a
snapshot into the HF cache (launcher/hub.py: once, pinned to a commit) and read with
`datasets.load_dataset` on that snapshot, so subsets and splits mean what they mean on the Hub
(the README's `configs:` or the folder layout). Mixing picks rows with a generator seeded from
the recipe's seed and the source's position: the same recipe always trains on the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import datasets
import torch
from datasets import Dataset, concatenate_datasets

from launcher import hub
from launcher.errors import DataError
from launcher.recipe import DataConfig, SourceConfig


@dataclass
class Source:
    label: str  # how messages and the plan name it
    file: str  # the local file, or the Hub snapshot directory
    config: SourceConfig
    key: Optional[str] = None  # cache-key part beyond the file (subset, split, columns); None for a plain file
    digest: str = ""  # its content: a local file's hash (data/digest.py), a Hub dataset's commit


@dataclass
class Share:
    label: str
    rows: int  # rows in the mixture (after filtering, repeats included)
    tokens: int  # their tokens
    share: float  # of the mixture's rows


def listed(cfg: DataConfig) -> List[SourceConfig]:
    return [SourceConfig(path=f) for f in cfg.train_files] + list(cfg.sources)


def data_config(cfg: DataConfig, src: Source) -> DataConfig:
    """data.* as this source reads it (its own format)."""
    return dataclasses.replace(cfg, format=src.config.format) if src.config.format else cfg


def load(cfg: DataConfig, cache: Path, read_file) -> List[tuple]:
    """[(Source, raw rows)] for every training source. `read_file(path, cache)` reads a local file: (rows, digest)."""
    out = []
    for i, sc in enumerate(listed(cfg)):
        where = f"data.sources[{i - len(cfg.train_files)}]" if i >= len(cfg.train_files) else "data.train_files"
        if hub.is_hub_id(sc.path) and Path(sc.path).suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv"):
            src, raw = _hub_source(sc, cache, f"{where}.path")
        else:
            if sc.subset or sc.revision or sc.split != "train":
                raise DataError(f"{where}: {sc.path} is a local file; split, subset and revision are for Hub datasets (ORG/NAME). Remove them.")
            raw, digest = read_file(sc.path, cache)
            src = Source(label=sc.path, file=sc.path, config=sc, key=json.dumps(dict(sc.columns), sort_keys=True) if sc.columns else None,
                         digest=digest)
        out.append((src, _map_columns(raw, src, where)))
    return out


def _hub_source(sc: SourceConfig, cache: Path, key: str):
    r = hub.resolve("dataset", sc.path, sc.revision, key)
    label = f"{sc.path}" + (f"[{sc.subset}]" if sc.subset else "") + f":{sc.split}"
    where = key.rsplit(".", 1)[0]
    try:
        subsets = datasets.get_dataset_config_names(r.path)
    except Exception:  # no README configs: the one default subset
        subsets = []
    if sc.subset and subsets and sc.subset not in subsets:
        raise DataError(f"{where}.subset: {sc.path} has no subset {sc.subset!r}; its subsets are {', '.join(subsets)}. Set subset to one of them.")
    if not sc.subset and len(subsets) > 1:
        raise DataError(f"{where}: {sc.path} has several subsets ({', '.join(subsets)}); choose one with subset: NAME.")
    try:
        splits = list(datasets.load_dataset_builder(r.path, sc.subset, cache_dir=str(cache / "datasets")).config.data_files or {})
    except Exception as e:
        raise DataError(f"{where}: {sc.path} (commit {r.commit}) could not be read as a dataset: {str(e).splitlines()[0]}.") from None
    if splits and sc.split not in splits:
        raise DataError(f"{where}.split: {sc.path}{'[' + sc.subset + ']' if sc.subset else ''} has no split {sc.split!r}; its splits are {', '.join(splits)}.")
    try:
        raw = datasets.load_dataset(r.path, sc.subset, split=sc.split, cache_dir=str(cache / "datasets"))
    except Exception as e:  # datasets raises many types for unreadable data
        raise DataError(f"{where}: {label} (commit {r.commit}) could not be loaded: {str(e).splitlines()[0]}.") from None
    if len(raw) == 0:
        raise DataError(f"{where}: {label} has no rows.")
    key_part = json.dumps([sc.subset, sc.split, dict(sc.columns)])
    # A commit names the content: the snapshot cannot change under it.
    return Source(label=label, file=r.path, config=sc, key=key_part, digest=f"hub:{r.commit}"), raw


def _map_columns(raw: Dataset, src: Source, where: str) -> Dataset:
    mapping = dict(src.config.columns)
    if not mapping:
        return raw
    missing = [col for col in mapping.values() if col not in raw.column_names]
    if missing:
        raise DataError(
            f"{where}.columns: {src.label} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(raw.column_names)}. Map each field the format reads to one of those, e.g. columns: {{messages: {raw.column_names[0]}}}."
        )
    # Fields the mapping fills replace same-named columns, so `messages` is not read from the wrong one.
    raw = raw.remove_columns([c for c in raw.column_names if c in mapping and c not in mapping.values()])
    return raw.rename_columns({col: name for name, col in mapping.items() if col != name})


def _take(n_rows: int, n: int, generator: torch.Generator) -> List[int]:
    """n row indices out of n_rows: whole copies first, then a seeded sample without repeats."""
    whole, rest = divmod(n, n_rows)
    return list(range(n_rows)) * whole + sorted(torch.randperm(n_rows, generator=generator)[:rest].tolist())


def _tokens(ds: Dataset) -> int:
    """Tokens in `ds`, counted in Arrow (a Python list of every row's ids would not fit a large dataset)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(ds.with_format("arrow")["input_ids"])).as_py() or 0) if len(ds) else 0


def mix(parts: List[Dataset], sources: List[Source], seed: int) -> tuple:
    """The training mixture of the tokenized sources and each one's Share of it.

    Weights: the largest mixture with those proportions in which no row repeats (the scarcest
    source, relative to its weight, is used whole). Fractions: that share of a source's rows."""
    weights = [s.config.weight for s in sources]
    if all(w is not None for w in weights):
        total_w = sum(weights)
        size = min(len(p) / (w / total_w) for p, w in zip(parts, weights) if w > 0)
        counts = [math.floor(size * w / total_w + 1e-9) for w in weights]
    else:
        counts = [round(len(p) * (s.config.fraction if s.config.fraction is not None else 1.0)) for p, s in zip(parts, sources)]
    chosen, shares = [], []
    for i, (part, src, n) in enumerate(zip(parts, sources, counts)):
        if n == len(part) and src.config.fraction is None and src.config.weight is None:
            pick = part
        else:
            pick = part.select(_take(len(part), n, torch.Generator().manual_seed(seed * 1000 + i)), keep_in_memory=True) if n and len(part) else part.select([])
        chosen.append(pick)
        shares.append(Share(src.label, len(pick), _tokens(pick), 0.0))
    total = sum(s.rows for s in shares) or 1
    for s in shares:
        s.share = s.rows / total
    kept = [c for c in chosen if len(c)] or chosen[:1]
    return (concatenate_datasets(kept) if len(kept) > 1 else kept[0]), shares
