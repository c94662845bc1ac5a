"""Per-rank bytes of parameters + gradients + AdamW state under FSDP2 and under DDP.

Run as `python -m torch.distributed.run --standalone --nproc_per_node=2 tests/helpers/fsdp_bytes.py OUT CACHE`.
Each engine takes one optimizer step (so AdamW state exists) and a second forward/backward
(so gradients exist); then the tensors this rank actually holds are counted: the local
shard of a DTensor, the whole tensor otherwise. Rank 0 writes {"fsdp": [...], "ddp": [...]}.
"""

import json
import sys
from pathlib import Path

import torch

from launcher import dist as dist_mod
from launcher import engines
from launcher.builtin import materialize
from launcher.data.batches import pad_collate
from launcher.data.tokenize import tokenize_conversation
from launcher.model import load_model, load_tokenizer
from launcher.recipe import load_recipe
from launcher.train import accumulate_gradients, train_step

REPO = Path(__file__).resolve().parents[2]
CONVERSATIONS = [
    [{"role": "user", "content": "repeat: a b c d"}, {"role": "assistant", "content": "a b c d"}],
    [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three four five"}],
]


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def held_bytes(engine) -> int:
    total = 0
    for p in engine.model.parameters():  # parameters() yields a tied weight once
        total += _local_bytes(p) + (_local_bytes(p.grad) if p.grad is not None else 0)
    for state in engine.optimizer.state.values():
        total += sum(_local_bytes(v) for v in state.values() if torch.is_tensor(v))
    return total


def measure(backend: str, path, tokenizer, dist) -> int:
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"strategy.backend={backend}"])
    torch.manual_seed(0)
    model = load_model(path, recipe.model, torch.float32, dist.device)
    engine = engines.build(recipe, model, dist, 1)
    rows = [tokenize_conversation(tokenizer, c) for c in CONVERSATIONS]
    batch = pad_collate([r["input_ids"] for r in rows], [r["labels"] for r in rows], tokenizer.pad_token_id)
    train_step(engine, [batch], dist, 1.0)
    accumulate_gradients(engine, [batch], dist)
    return held_bytes(engine)


def main(out: str, cache: str) -> None:
    dist = dist_mod.init()
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    with dist.local_main_first():
        path = materialize(recipe.model.path, Path(cache))
    tokenizer = load_tokenizer(path, recipe.model)
    result = {}
    for backend in ("fsdp", "ddp"):
        mine = torch.tensor([float(measure(backend, path, tokenizer, dist))])
        every = [torch.zeros(1) for _ in range(dist.world_size)]
        torch.distributed.all_gather(every, mine)
        result[backend] = [int(t.item()) for t in every]
    if dist.is_main:
        Path(out).write_text(json.dumps(result))
    dist_mod.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
