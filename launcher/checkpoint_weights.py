"""Reading a checkpoint's model back, for `sft export` and its verification, and for resume's checks:
whether a model has the architecture a checkpoint was trained on (`model_differences`), and copying
the checkpoint's trained tensors into a model on CPU (`load_weights`) from DCP (ddp, fsdp) or
DeepSpeed ZeRO files, without a process group or a GPU. A checkpoint that does not fit the model
built from its recipe is one UserError naming the first tensor that does not fit.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Iterable

import torch

from launcher.checkpoint import read_state
from launcher.errors import UserError

_ARCHITECTURE = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")


def model_differences(checkpoint_hf: Path, model_path: Path) -> list:
    """How the model at `model_path` differs in architecture from the one a checkpoint was trained on."""
    from transformers import AutoConfig

    trained, found = AutoConfig.from_pretrained(checkpoint_hf), AutoConfig.from_pretrained(model_path)
    return [
        f"{k} is {getattr(trained, k, None)!r} in the checkpoint but {getattr(found, k, None)!r} in {model_path}"
        for k in _ARCHITECTURE
        if getattr(trained, k, None) != getattr(found, k, None)
    ]


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
    with warnings.catch_warnings():
        # Export reads on one process without a group; DCP warns that it assumes one process, which is right.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": {n: target[n] for n in names}}, checkpoint_id=str(path))
    return names


def _deepspeed_tensors(path: Path, target: dict, ckpt: Path, zero_stage: int) -> Iterable[str]:
    if zero_stage == 0:
        # weights_only: unpickling a checkpoint someone else wrote must not run code. ZeRO-0's file holds the
        # module's tensors, the optimizer's (torch's, or DeepSpeed's fp16/bf16 wrapper's: tensors and numbers),
        # torch.Size shapes, ints, strings and the DeepSpeed config: nothing else.
        file = path / "deepspeed" / "mp_rank_00_model_states.pt"
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as e:
            raise UserError(
                f"{file} holds Python objects other than tensors ({str(e).strip().splitlines()[0]}), which sft export does not "
                "unpickle (that could run code from whoever wrote the checkpoint). Export a checkpoint this tool wrote."
            ) from None
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
