"""Which examples each rank sees at each optimizer step, and how they become tensors.

The order is a pure function of (seed, epoch, step), so any step's batches can be
recomputed (resume needs that) and every engine sees the same data. An optimizer step
takes `global_batch` examples; rank r takes its contiguous share and cuts it into
micro-batches. The remainder of an epoch that does not fill a global batch is skipped,
which keeps every rank doing the same number of forward passes.

Within a step, with the examples' `lengths` known: packed (`pack_tokens` > 0), each rank's
share becomes padding-free rows (data/packing.py); unpacked, the step's examples are sorted by
length and dealt to ranks micro-batch by micro-batch, so similar lengths share a micro-batch
and padding is small. Either way a step trains on the same examples, only laid out differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from launcher.data.packing import collate_packed, pack_step
from launcher.data.tokenize import IGNORE


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    seed: int
    shuffle: bool
    # tokens per example, in dataset order; None: micro-batches in drawn order
    lengths: Optional[Sequence[int]] = field(default=None, repr=False, compare=False)
    # > 0: pack each rank's examples into padding-free micro-batches of at most this many tokens
    pack_tokens: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def epoch_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def step_examples(self, step: int) -> List[int]:
        """The example indices of 0-based optimizer `step`, on all ranks together."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[within * self.global_batch : (within + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int) -> List[List[int]]:
        """Example indices of each micro-batch of 0-based optimizer `step` for `rank` (packed: of each row)."""
        chosen = self.step_examples(step)
        if self.pack_tokens:
            return pack_step(chosen, self.lengths, self.world_size, self.pack_tokens)[rank]
        m = self.micro_batch_size
        if self.lengths is None:
            mine = chosen[rank * m * self.accumulation : (rank + 1) * m * self.accumulation]
            return [mine[i : i + m] for i in range(0, len(mine), m)]
        by_length = sorted(chosen, key=lambda i: (-self.lengths[i], i))
        groups = [by_length[i : i + m] for i in range(0, len(by_length), m)]
        return groups[rank :: self.world_size]


def pad_collate(input_ids: List[List[int]], labels: Optional[List[List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest row; padded labels are ignored by the loss. No `labels`: no label tensor."""
    longest = max(len(r) for r in input_ids)
    ids = torch.full((len(input_ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), longest), dtype=torch.long)
    for i, row in enumerate(input_ids):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.full((len(input_ids), longest), IGNORE, dtype=torch.long)
        for i, lab in enumerate(labels):
            batch["labels"][i, : len(lab)] = torch.tensor(lab)
    return batch


def collate(rows: Dict[str, list], pad_id: int, class_weights: Optional[List[float]] = None, packed: bool = False) -> Dict[str, torch.Tensor]:
    """A micro-batch from dataset columns (`packed`: one padding-free row). Sequence-classification rows
    (a class_id, no token labels) carry `class_ids` and `example_weights` (the class's loss weight; 0
    where class_id is IGNORE)."""
    if packed:
        return collate_packed(rows["input_ids"], rows["labels"], pad_id)
    if "labels" in rows:
        return pad_collate(rows["input_ids"], rows["labels"], pad_id)
    batch = pad_collate(rows["input_ids"], None, pad_id)
    class_ids = torch.tensor(rows["class_id"], dtype=torch.long)
    if class_weights:
        weights = torch.tensor(class_weights, dtype=torch.float32)[class_ids.clamp(min=0)]
    else:
        weights = torch.ones(len(class_ids))
    batch["class_ids"] = class_ids
    batch["example_weights"] = torch.where(class_ids == IGNORE, 0.0, weights)
    return batch
