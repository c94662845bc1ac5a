"""Train every (family, engine, lora) cell of the architecture matrix in ONE 2-rank process, then
export each on rank 0: `python -m torch.distributed.run --standalone --nproc_per_node 2 arch_matrix.py SPEC`.

SPEC (JSON): {"cells": [{"family", "engine", "lora", "out", "overrides": [key=value, ...] on recipes/quickstart.yaml]}]}.
One process pays torch/transformers/DeepSpeed imports and the process group once for all cells.
Rank 0 writes RESULT (SPEC's name + .result.json): each cell's losses and its export report."""

import gc
import json
import math
import sys
import time
from pathlib import Path

from transformers.integrations import is_deepspeed_zero3_enabled

from launcher import dist as dist_mod
from launcher.recipe import load_recipe
from launcher.worker import _quiet_libraries, export_final, run

REPO = Path(__file__).resolve().parents[2]


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    _quiet_libraries()
    recipes = [load_recipe(REPO / "recipes/quickstart.yaml", c["overrides"]) for c in spec["cells"]]
    dist = dist_mod.init(600)
    results = []
    for cell, recipe in zip(spec["cells"], recipes):
        print(f"arch-matrix: training {cell['family']} on {cell['engine']} ({'LoRA' if cell['lora'] else 'full'})", file=sys.stderr, flush=True)
        # An earlier ZeRO-3 cell's HfDeepSpeedConfig must be gone, or from_pretrained would partition this model too.
        leaked = is_deepspeed_zero3_enabled()
        tick = time.perf_counter()
        result = run(recipe, dist)
        results.append({**cell, "final_loss": result["final_loss"], "zero3_leaked": leaked, "train_s": round(time.perf_counter() - tick, 1)})
        gc.collect()  # this cell's engine, shards and optimizer state
    dist_mod.shutdown()
    if dist.is_main:  # after the group is gone, as the worker does: an export must not race a peer's collective timeout
        for row, recipe in zip(results, recipes):
            report = json.loads((export_final(recipe) / "export.json").read_text())
            row["max_abs_logit_diff"], row["tolerance"] = report["max_abs_logit_diff"], report["tolerance"]
            row["checked_against_training"] = report["checked_against_training"]
            row["finite"] = math.isfinite(row["final_loss"])
            gc.collect()
        Path(spec_path + ".result.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    dist_mod.exit_process(main(sys.argv[1]))
