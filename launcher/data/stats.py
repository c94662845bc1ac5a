"""Statistics of the prepared data for the plan: token lengths per source, the share of target
tokens, and how much of the planned (right-padded) micro-batches is padding."""

from __future__ import annotations

import numpy as np
import pyarrow.compute


def row_lengths(dataset) -> np.ndarray:
    """Tokens of every row of a tokenized dataset, read from its Arrow column (no Python lists); through
    the arrow format so a filtered or selected dataset's index mapping is applied (`.data` ignores it)."""
    return pyarrow.compute.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy()


def length_summary(lengths: np.ndarray) -> str:
    if len(lengths) == 0:
        return "no rows kept"
    return f"tokens per row median {np.median(lengths):.0f}, p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}"


def padding_waste(batches, lengths: np.ndarray, max_steps: int = 200) -> float:
    """The share of the micro-batches' token slots that are padding over the first epoch's planned
    steps on every rank (up to `max_steps` of them), taken from the batch plan itself
    (data/batches.py): a padded micro-batch pads each row to its longest, a packed one is a single
    padding-free row."""
    slots = real = 0
    for step in range(min(batches.steps_per_epoch, max_steps)):
        for rank in range(batches.world_size):
            for micro in batches.micro_batches(step, rank):
                sizes = lengths[np.asarray(micro, dtype=np.int64)] if micro else np.zeros(0, dtype=np.int64)
                real += int(sizes.sum())
                slots += int(sizes.sum()) if batches.pack_tokens else int(sizes.max(initial=0)) * len(micro)
    return 1 - real / slots if slots else 0.0
