"""Packing: a rank's examples of one optimizer step become padding-free rows.

Packing changes how a step is computed, not what it computes: the step's examples are the
same ones as without packing (batches.BatchPlan picks them), and its loss is still the sum of
their token losses over their target tokens. Within the step:

- the examples are dealt to ranks longest first, each to the rank with the fewest tokens so
  far, so ranks do similar work;
- each rank packs its examples best-fit-decreasing into micro-batches of at most
  `budget` tokens (data.pack_tokens, default micro_batch_size x max_seq_len);
- ranks with fewer micro-batches split their fullest ones (or, when no micro-batch has two
  examples left to split, add an empty one), so every rank runs the same number of forward
  passes: sharded engines need equal collectives.

Everything is a pure function of the step's example indices and lengths, hence of (seed,
epoch, step). A micro-batch is one row [1, T]: `position_ids` restart at 0 for each example,
each example's first label is ignored (no token of the previous example predicts it), and
`cu_seq_lens_q/k` mark the boundaries for the attention (launcher/attention.py). There is no
attention mask.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from launcher.data.tokenize import IGNORE

# The model inputs of a packed row; an attention mask is never one of them.
PACKED_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# With data.packing unset, pack only when padded micro-batches would waste at least this share of their
# token slots: for rows of similar length packing saves little, and attention per example costs more.
AUTO_MIN_PADDING = 0.10


def allowed(recipe) -> bool:
    """Whether packing may be on: data.packing, or where unset sft with an attention that keeps examples apart."""
    from launcher.attention import packs_cleanly

    if recipe.data.packing is not None:
        return recipe.data.packing
    return recipe.task.type == "sft" and packs_cleanly(recipe.model.attn_implementation)


def enabled(recipe, unpacked_padding: float) -> bool:
    """data.packing; where unset, on when allowed and the unpacked (length-grouped) micro-batches would
    be at least AUTO_MIN_PADDING padding (data/stats.padding_waste). A pure function of the data, so
    `sft plan` and every worker decide alike."""
    if recipe.data.packing is not None:
        return recipe.data.packing
    return allowed(recipe) and unpacked_padding >= AUTO_MIN_PADDING


def budget(recipe) -> int:
    """Tokens per packed micro-batch: data.pack_tokens, or as many as a full padded micro-batch holds."""
    return recipe.data.pack_tokens or recipe.train.micro_batch_size * recipe.data.max_seq_len


def example_lengths(dataset) -> List[int]:
    """Tokens per example, read from the Arrow column without decoding the token lists."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids"))
    if dataset._indices is not None:  # filter/select leave a mapping onto the full table
        lengths = lengths.take(dataset._indices.column(0))
    return lengths.to_pylist()


def deal_to_ranks(indices: Sequence[int], lengths: Sequence[int], world: int) -> List[List[int]]:
    """Longest-processing-time assignment of a step's examples to ranks (ties: lower index, lower rank)."""
    shares: List[List[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return shares


def best_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Bins of at most `budget` tokens; each example goes to the fullest bin it still fits in."""
    bins: List[List[int]] = []
    free: List[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > budget:
            raise ValueError(f"an example of {n} tokens does not fit the packing budget of {budget} tokens")
        fits = [b for b in range(len(bins)) if free[b] >= n]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
            bins[b].append(i)
            free[b] -= n
        else:
            bins.append([i])
            free.append(budget - n)
    return bins


def _split(bins: List[List[int]], lengths: Sequence[int]) -> bool:
    """Split the fullest bin that has two or more examples into two; False when none has."""
    splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
    if not splittable:
        return False
    b = max(splittable, key=lambda b: (sum(lengths[i] for i in bins[b]), -b))
    halves: List[List[int]] = [[], []]
    load = [0, 0]
    for i in bins[b]:  # already longest first
        h = 0 if load[0] <= load[1] else 1
        halves[h].append(i)
        load[h] += lengths[i]
    bins[b:b + 1] = halves
    return True


def pack_step(indices: Sequence[int], lengths: Sequence[int], world: int, budget: int) -> List[List[List[int]]]:
    """Per rank, the example indices of each micro-batch of one step; the same count on every rank.
    An empty micro-batch ([]) becomes a single ignored token (collate_packed)."""
    per_rank = [best_fit_decreasing(share, lengths, budget) for share in deal_to_ranks(indices, lengths, world)]
    count = max(len(bins) for bins in per_rank)
    for bins in per_rank:
        while len(bins) < count:
            if not _split(bins, lengths):
                bins.append([])
    return per_rank


def collate_packed(input_ids: List[List[int]], labels: List[List[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    """One padding-free row of the given examples, with what transformers' packed path reads."""
    if not input_ids:  # a filler micro-batch: one token, nothing to learn
        input_ids, labels = [[pad_id]], [[IGNORE]]
    ids, labs, pos, bounds = [], [], [], [0]
    for row, lab in zip(input_ids, labels):
        ids += row
        labs += [IGNORE] + list(lab[1:])  # the first token has no prediction inside its own example
        pos += range(len(row))
        bounds.append(bounds[-1] + len(row))
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labs], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }
