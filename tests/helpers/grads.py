"""Runs forward/backward of one optimizer step and saves the gradients (rank 0).

Run as `python tests/helpers/grads.py OUT MICRO ACCUM CACHE [packed]` alone or under torchrun;
`packed`: each rank's share of the step in padding-free rows (data/packing.py).
"""

import sys
from pathlib import Path

import torch

from launcher import dist as dist_mod
from launcher.builtin import materialize
from launcher.data.batches import BatchPlan, pad_collate
from launcher.data.packing import collate_packed
from launcher.data.tokenize import tokenize_conversation
from launcher.engines.ddp import DDPEngine
from launcher.model import load_model, load_tokenizer
from launcher.recipe import ModelConfig, TrainConfig
from launcher.train import accumulate_gradients

# Replies of very different lengths, so a per-micro-batch mean would weight tokens unequally.
CONVERSATIONS = [
    [{"role": "user", "content": "say a"}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three four five six seven eight nine ten"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "the quick brown fox"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "jumps over the lazy dog"}],
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}],
]


def main(out: str, micro: int, accum: int, cache: str, packed: bool = False) -> None:
    dist = dist_mod.init()
    cfg = ModelConfig(path="builtin:tiny-llama")
    with dist.local_main_first():
        path = materialize(cfg.path, Path(cache))
    tokenizer = load_tokenizer(path, cfg)
    model = load_model(path, cfg, torch.float32, dist.device, packing=packed)
    rows = [tokenize_conversation(tokenizer, c) for c in CONVERSATIONS]
    lengths = [len(r["input_ids"]) for r in rows]
    plan = BatchPlan(len(rows), micro, accum, dist.world_size, seed=0, shuffle=False, lengths=lengths if packed else None, pack_tokens=64 if packed else 0)
    collate = collate_packed if packed else pad_collate
    batches = [collate([rows[i]["input_ids"] for i in mb], [rows[i]["labels"] for i in mb], tokenizer.pad_token_id) for mb in plan.micro_batches(0, dist.rank)]
    engine = DDPEngine.create(model, TrainConfig(), dist)
    stats = accumulate_gradients(engine, batches, dist)
    if dist.is_main:
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.save({"grads": grads, "loss": stats["loss"]}, out)
    dist_mod.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], packed=sys.argv[5:] == ["packed"])
    dist_mod.exit_process(0)
