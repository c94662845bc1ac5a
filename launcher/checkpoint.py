"""Checkpoints: engine-native shards plus trainer state, committed atomically.

Layout of `output_dir/checkpoints/`:

    .partial-step-000040/   being written (ignored, and removed by the next save)
    step-000040/
      model/                 the engine's own files: DCP (ddp, fsdp) or DeepSpeed's tag dir
      rng/rank-00000.pt      python, numpy and torch RNG state of each rank
      trainer_state.json     step, engine, dtype, base model, ...
      recipe.yaml            the run's resolved recipe
      hf/                    config, generation config, tokenizer (what export needs besides weights)
      verify_prompts.json    a few token sequences export checks its logits on
      COMPLETE               written last, after every rank has finished its shards
    latest                   the name of the newest complete checkpoint

LoRA runs save only trainable tensors (adapters, modules_to_save) and their optimizer state.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from launcher.errors import UserError

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list:
    """This run's complete checkpoints, oldest first, ordered by step number (not as strings)."""
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(run_dir: Path) -> Optional[Path]:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / COMPLETE).is_file():
            return named
    done = complete_checkpoints(root)  # `latest` lost or stale: the newest complete one still counts
    return done[-1] if done else None


def resolve(path: Path) -> Path:
    """A checkpoint directory from a run dir (its latest) or a checkpoint dir; UserError otherwise."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    if (path / "trainer_state.json").is_file():
        raise UserError(f"{path} is an incomplete checkpoint (no {COMPLETE} marker: it was interrupted while saving). Use an earlier one, or the run dir.")
    found = latest(path) if path.is_dir() else None
    if found is None:
        what = "does not exist" if not path.exists() else "has no complete checkpoint (checkpoints/step-*/COMPLETE)"
        raise UserError(f"{path} {what}. Give a run's output_dir or one of its checkpoints/step-NNNNNN directories.")
    return found


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save(engine, run_dir: Path, step: int, dist, keep_last: int, meta: dict, write_extras) -> Path:
    """Collective: every rank writes its shards; rank 0 commits. `write_extras(dir)` runs on rank 0."""
    root = Path(run_dir) / "checkpoints"
    tmp = root / f".partial-{step_name(step)}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".partial-*"):  # from a save that was interrupted
            shutil.rmtree(leftover)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(tmp / "model")
    torch.save(_rng_state(), tmp / "rng" / f"rank-{dist.rank:05d}.pt")
    if dist.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": dist.world_size, **meta}, indent=2))
        write_extras(tmp)
    dist.barrier()  # every rank's shards are on disk
    final = root / step_name(step)
    if dist.is_main:
        _commit(tmp, final, root, keep_last)
    dist.barrier()
    return final


def _commit(tmp: Path, final: Path, root: Path, keep_last: int) -> None:
    (tmp / COMPLETE).write_text("")
    if final.exists():  # the same step saved again by a restarted attempt
        old = root / f".partial-replaced-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")  # atomic: readers see the old or the new name, never half
    step = int(_STEP_DIR.match(final.name).group(1))
    older = [p for p in complete_checkpoints(root) if int(_STEP_DIR.match(p.name).group(1)) < step]
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(p)


# Reading weights back (export), without a process group or a GPU.


def _mismatch(ckpt: Path, detail: str) -> UserError:
    return UserError(
        f"checkpoint {ckpt} does not fit the model built from its recipe ({detail}). It was made with a "
        "different model or LoRA setting; export it with the recipe (and base model) it was trained with."
    )


def _dcp_tensors(path: Path, target: dict, ckpt: Path) -> Iterable[str]:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    names = [k[len("model."):] for k in metadata.state_dict_metadata if k.startswith("model.")]
    unknown = [n for n in names if n not in target]
    if unknown:
        raise _mismatch(ckpt, f"it holds {unknown[0]!r}, which the model has not")
    dcp.load({"model": {n: target[n] for n in names}}, checkpoint_id=str(path))
    return names


def _deepspeed_tensors(path: Path, target: dict, ckpt: Path, zero_stage: int) -> Iterable[str]:
    if zero_stage == 0:
        state = torch.load(path / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress report per file
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed", exclude_frozen_parameters=True, lazy_mode=True)
    for name in state:
        if name not in target:
            raise _mismatch(ckpt, f"it holds {name!r}, which the model has not")
        value = state[name]
        value = value.contiguous() if not isinstance(value, torch.Tensor) else value  # lazy: read one at a time
        if value.shape != target[name].shape:
            raise _mismatch(ckpt, f"{name} has shape {tuple(value.shape)} there, {tuple(target[name].shape)} in the model")
        with torch.no_grad():
            target[name].copy_(value)
    return list(state)


def load_weights(ckpt: Path, model: torch.nn.Module) -> int:
    """Copy a checkpoint's trained tensors into `model` (on CPU); every trainable parameter of `model`
    must be among them. Returns how many tensors were read."""
    state = read_state(ckpt)
    target = model.state_dict(keep_vars=True)
    target = {k: (v.data if isinstance(v, torch.nn.Parameter) else v) for k, v in target.items()}
    if state["backend"] == "deepspeed":
        names = _deepspeed_tensors(ckpt / "model", target, ckpt, state.get("zero_stage", 0))
    else:
        names = _dcp_tensors(ckpt / "model", target, ckpt)
    read = set(names)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in read]
    if missing:
        raise _mismatch(ckpt, f"it has no value for {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return len(read)
