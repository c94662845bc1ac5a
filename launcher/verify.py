"""What `sft export` checks a model against, recorded from the live training model at save time.

Export rebuilds the trained model from a checkpoint and compares the exported model with it, but
both pass through the same loading path, so they would share a consolidation error; and a LoRA
base that is another model of the same shape (Instruct instead of base, an updated local copy)
would merge and verify. So every checkpoint also holds `verify_reference.safetensors`:

    logits.I, positions.I   the live model's float32 logits on verify prompt I at a few positions
                            (a sequence classifier: its class logits), taken in eval mode by every
                            rank at once, since under ZeRO-3 and FSDP each forward is a collective
    metadata                base_fingerprint: a digest of the base model's weights (LoRA runs),
                            which export recomputes on the base it is about to merge onto
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

FILE = "verify_reference.safetensors"
POSITIONS = 4  # full-vocabulary logits at this many positions per prompt: ~2 MB per prompt at 150k vocab
ROWS, COLUMNS = 16, 4096  # what the base fingerprint reads of each tensor


@torch.no_grad()
def live_logits(model: torch.nn.Module, prompts: Sequence[Sequence[int]], device) -> dict:
    """Collective under ZeRO-3 and FSDP: every rank must call it with the same prompts. Eval mode (no
    dropout, so no RNG is drawn); the model's train/eval mode is put back after."""
    training = model.training
    model.eval()
    tensors = {}
    try:
        for i, ids in enumerate(prompts):
            logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits[0]
            if logits.ndim == 2:  # a causal LM: one row per position; keep a few, the last included
                positions = torch.linspace(0, logits.size(0) - 1, min(POSITIONS, logits.size(0))).round().long().unique()
                tensors[f"positions.{i}"], logits = positions, logits[positions.to(logits.device)]
            tensors[f"logits.{i}"] = logits.float().cpu().contiguous()
    finally:
        model.train(training)
    return tensors


def write(directory: Path, tensors: dict, base: Optional[Path]) -> None:
    """On rank 0: the live logits and, for a LoRA run, the fingerprint of the base it trained on."""
    from safetensors.torch import save_file

    metadata = {"format": "1", "base_model": str(base or ""), "base_fingerprint": (fingerprint(base) if base else None) or ""}
    save_file(tensors, str(Path(directory) / FILE), metadata=metadata)


def read(ckpt: Path) -> Optional[dict]:
    """{"logits", "positions" (None for class logits), "base_fingerprint", "base_model"}; None for a
    checkpoint written before this file existed."""
    from safetensors import safe_open

    path = Path(ckpt) / FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta, names = f.metadata() or {}, set(f.keys())
        n = sum(1 for k in names if k.startswith("logits."))
        logits = [f.get_tensor(f"logits.{i}") for i in range(n)]
        positions = [f.get_tensor(f"positions.{i}") if f"positions.{i}" in names else None for i in range(n)]
    return {"logits": logits, "positions": positions, "base_fingerprint": meta.get("base_fingerprint") or None,
            "base_model": meta.get("base_model") or None}


def max_difference(stored: dict, full: Sequence[torch.Tensor]) -> float:
    """Largest |difference| between the stored live logits and a model's logits on the same prompts."""
    diffs = []
    for live, positions, logits in zip(stored["logits"], stored["positions"], full):
        logits = logits.float()
        diffs.append(float((live - (logits[positions] if positions is not None else logits)).abs().max()))
    return max(diffs)


def _sample(f, name: str) -> torch.Tensor:
    """Up to ROWS rows spread over dim 0, each its first COLUMNS values (other dims at index 0)."""
    piece = f.get_slice(name)
    shape = piece.get_shape()
    if len(shape) == 0 or 0 in shape:
        return f.get_tensor(name).flatten()
    rows = sorted({round(k * (shape[0] - 1) / (ROWS - 1)) for k in range(ROWS)})
    rest = [slice(0, 1)] * max(len(shape) - 2, 0) + ([slice(0, min(shape[-1], COLUMNS))] if len(shape) > 1 else [])
    return torch.cat([piece[(slice(r, r + 1), *rest)].flatten() for r in rows])


@functools.lru_cache(maxsize=4)
def fingerprint(path: Path) -> Optional[str]:
    """A digest of the weights in a model directory's safetensors files, from sampled rows of every
    tensor rounded to bfloat16: another training seed or a fine-tuned copy gives another digest,
    while re-sharding, an fp32/bf16 copy of the same weights or a tied head stored twice do not
    change it. Reads a few MB however large the model. None when the model has no safetensors."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():  # the model's own files only (some repositories ship other formats next to them)
        files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        return None
    digests = set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                values = _sample(f, name).float().to(torch.bfloat16).view(torch.int16).numpy().tobytes()
                digests.add(hashlib.sha256(repr(f.get_slice(name).get_shape()).encode() + values).hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:32]
