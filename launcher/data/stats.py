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


def padding_waste(batches, lengths: np.ndarray) -> float:
    """The share of the micro-batches' token slots that are padding over the first epoch's planned
    steps on every rank (each micro-batch is padded to its longest row). A step's global batch is a
    contiguous slice of the epoch order, and each rank's share cuts into consecutive micro-batches
    (data/batches.py), so the epoch's micro-batches are consecutive runs of micro_batch_size."""
    m = batches.micro_batch_size
    used = batches.steps_per_epoch * batches.global_batch
    if used == 0:
        return 0.0
    rows = lengths[np.asarray(batches.epoch_order(0)[:used])].reshape(-1, m)
    return 1 - rows.sum() / (m * rows.max(axis=1).sum())
