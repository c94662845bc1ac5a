"""Checkpoints: engine-native shards plus trainer state and RNG states, written by every rank and
committed atomically by rank 0 (`save`), rotated, found again (`latest`, `resolve`) and restored
(`read_state`, `restore_rng`). What makes a committed checkpoint trustworthy (the COMPLETE marker,
MANIFEST.json, damage) is launcher/checkpoint_integrity.py's; reading its weights back into a model
(export, resume's architecture check) is launcher/checkpoint_weights.py's.

Layout of `output_dir/checkpoints/`:

    .partial-step-000040/   being written (ignored; removed by the next save or `sft run`)
    step-000040/
      model/                 the engine's own files: DCP (ddp, fsdp) or DeepSpeed's tag dir
      rng/rank-00000.safetensors  torch and CUDA RNG state of each rank (python's, numpy's as JSON metadata)
      trainer_state.json     step, epoch, global batch, LR scheduler, engine, dtype, base model, stopped_by
      recipe.yaml            the run's resolved recipe
      hf/                    config, generation config, tokenizer (what export needs besides weights)
      verify_prompts.json    a few token sequences export checks its logits on
      verify_reference.safetensors  the live model's logits on them at save time, the base's fingerprint (verify.py)
      MANIFEST.json          size and digest of every file above (checkpoint_integrity.py)
      COMPLETE               written last, after every rank has finished its shards
    latest                   the name of the newest complete checkpoint

LoRA runs save only trainable tensors (adapters, modules_to_save) and their optimizer state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launcher.checkpoint_integrity import COMPLETE, complete_checkpoints, step_of, write_manifest
from launcher.errors import UserError


def step_name(step: int) -> str:
    return f"step-{step:06d}"


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


def _rng_file(ckpt: Path, rank: int, suffix: str = ".safetensors") -> Path:
    return ckpt / "rng" / f"rank-{rank:05d}{suffix}"


def save_rng(path: Path) -> None:
    """This rank's RNG states as safetensors (torch's, and its own CUDA device's) with python's and
    numpy's states as JSON in the metadata: no pickle, so a checkpoint from elsewhere cannot run code.
    Only this rank's device: a resume on fewer GPUs per node has no device for the others."""
    from safetensors.torch import save_file

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    meta = {"python": json.dumps([version, list(words), gauss]),
            "numpy": json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=meta)


def local_cuda_state(saved, device_index: int) -> Optional[torch.Tensor]:
    """The CUDA RNG state for this process's device from what a rank saved: its own device's state
    (a tensor), or in checkpoints written before, one state per device of its node (a list), of
    which only this rank's own counts. None when there is none for it."""
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, (list, tuple)) and device_index < len(saved):
        return saved[device_index]
    return None


def remove_partials(run_dir: Path) -> list:
    """Delete what interrupted saves left (`.partial-*`); only a run's rank 0 or its launcher calls this."""
    root = Path(run_dir) / "checkpoints"
    found = sorted(root.glob(".partial-*")) if root.is_dir() else []
    for leftover in found:
        shutil.rmtree(leftover, ignore_errors=True)  # one that cannot go yet (NFS: a file still open) is tried next time
    return [p for p in found if not p.exists()]


class SaveError(UserError):
    """A checkpoint could not be written (full disk, permissions); the previous one is untouched."""


def _all_ok(dist, ok: bool) -> list:
    """Collective: the ranks whose `ok` is False (an all-reduce, so it also synchronises)."""
    flags = torch.zeros(dist.world_size)
    flags[dist.rank] = 0.0 if ok else 1.0
    return [r for r, f in enumerate(dist.all_reduce_sum(flags).tolist()) if f]


def _save_failed(root: Path, name: str, failed: list, error: Optional[BaseException], dist) -> SaveError:
    if error is not None and getattr(error, "failures", None):  # DCP gathers every rank's exception
        error = next(iter(error.failures.values()))  # (exception, its stack)
        error = error[0] if isinstance(error, tuple) else error
    mine = f"{type(error).__name__}: {str(error).strip()}" if error is not None else ""
    # Collective (every rank is here): rank 0's console names each failing rank's own error.
    causes = [(r, text) for r, text in enumerate(dist.all_gather_text(mine)) if text]
    before = latest(root.parent)
    ranks = ", ".join(str(r) for r in failed)
    free = shutil.disk_usage(root).free / 2**30 if root.exists() else float("nan")
    return SaveError(
        f"saving checkpoint {name} under {root} ({free:.1f} GiB free) failed on rank {ranks} "
        f"({'; '.join(f'rank {r}: {text}' for r, text in causes[:2])}). "
        f"The previous checkpoint ({before.name if before else 'none'}) and `latest` are unchanged and nothing partial was kept. "
        "Free disk space or fix the directory's permissions, then run the same command again to resume from it."
    )


def _hold_for_tests(tmp: Path, step: int) -> None:
    # Fault tests kill the run at the one moment a crash is most harmful: every shard written, nothing
    # committed. A test sets this variable, waits for the marker and sends SIGKILL; users never set it.
    if os.environ.get("SFT_TEST_HOLD_BEFORE_COMMIT") == str(step):
        (tmp / "HELD_FOR_TEST").write_text("")
        os.kill(os.getpid(), signal.SIGSTOP)


def save(engine, run_dir: Path, step: int, dist, keep_last: int, state: dict, write_extras) -> Path:
    """Collective: every rank writes its shards; rank 0 commits. `write_extras(dir)` runs on rank 0.
    Raises SaveError on every rank if any rank fails; the previous checkpoint stays as it was."""
    root = Path(run_dir) / "checkpoints"
    name = step_name(step)
    tmp = root / f".partial-{name}"
    error = None
    try:
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            remove_partials(run_dir)
            (tmp / "rng").mkdir(parents=True)
    except OSError as e:
        error = e
    failed = _all_ok(dist, error is None)
    if not failed:
        try:
            engine.save_checkpoint(tmp / "model")
            save_rng(_rng_file(tmp, dist.rank))
            if dist.is_main:
                (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": dist.world_size, **state}, indent=2))
                write_extras(tmp)
        except BaseException as e:  # DCP's CheckpointException is a BaseException; a failure must reach every rank
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = e
        failed = _all_ok(dist, error is None)  # every rank's shards are on disk, or some rank failed
    if not failed and dist.is_main:
        try:
            _hold_for_tests(tmp, step)
            _commit(tmp, root, step, keep_last)
        except OSError as e:
            error = e
    failed = failed or _all_ok(dist, error is None)
    if failed:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # give a full disk its space back
        raise _save_failed(root, name, failed, error, dist)
    return root / name


def _remove(path: Path) -> None:
    # Renamed first: a crash halfway through rmtree must not leave a half-deleted dir that still says COMPLETE.
    doomed = path.parent / f".partial-removing-{path.name}"
    path.rename(doomed)
    shutil.rmtree(doomed)


def _commit(tmp: Path, root: Path, step: int, keep_last: int) -> None:
    final = root / step_name(step)
    write_manifest(tmp)
    (tmp / COMPLETE).write_text("")
    if final.exists():  # the same step saved again (a resumed run passing an older run's step)
        _remove(final)
    tmp.rename(final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")  # atomic: readers see the old or the new name, never half
    older = [p for p in complete_checkpoints(root) if step_of(p) < step]
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        try:
            _remove(p)
        except OSError as e:  # the new checkpoint is committed: an old one that stays is no reason to stop
            print(f"warning: checkpoint {final.name} is saved, but removing the older {p.name} failed ({e}); "
                  "a later save tries again, or delete it by hand.", file=sys.stderr, flush=True)


def _read_rng(ckpt: Path, rank: int) -> Optional[dict]:
    path = _rng_file(ckpt, rank)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
        version, words, gauss = json.loads(meta["python"])
        kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
        state["python"] = (version, tuple(words), gauss)
        state["numpy"] = (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
        return state
    legacy = _rng_file(ckpt, rank, ".pt")  # checkpoints written before: a pickle, read without running code
    if legacy.is_file():
        multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
        allowed = [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        with torch.serialization.safe_globals(allowed):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    return None


def restore_rng(ckpt: Path, rank: int) -> bool:
    """Put back this rank's python, numpy, torch and CUDA RNG states; False if the checkpoint has none for it."""
    state = _read_rng(ckpt, rank)
    if state is None:
        return False
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = local_cuda_state(state.get("cuda"), torch.cuda.current_device())
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
    return True
