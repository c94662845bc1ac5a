"""Chunked cross-entropy: the loss of a micro-batch without its [tokens x vocab] float32 logits.

The model runs its own forward (through the engine's wrapper, so DDP, FSDP2 and ZeRO-3 hooks
gather, shard and reduce as usual), but its output head is called once on the hidden states and
computes, instead of logits, the summed cross-entropy of the target tokens, chunk by chunk:
only positions with a target are projected at all, each chunk of `chunk_tokens` of them goes
through the head's own forward under activation checkpointing, so backward recomputes that
chunk's logits instead of keeping them. The head is the module being called, so ZeRO-3 gathers
its weight for it (and again before its backward), FSDP2 has the root's parameters unsharded,
and a LoRA or modules_to_save wrapper around the head runs as it is.

The summed loss comes back as the model output's `logits` (a 0-d tensor). A model that changes
its logits after the head (Gemma's final softcapping, Cohere's logit scale) would change that
sum: such a change is detected and refused, with the fix named.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from launcher.data.tokenize import IGNORE


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside engine wrappers (DDP, DeepSpeed: `.module`) and peft."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


# Config fields of models that transform logits after the head (Gemma 2/3 softcapping, Cohere's scale).
AFTER_HEAD = ("final_logit_softcapping", "logit_scale")


def applies(model: torch.nn.Module) -> bool:
    """Whether the loss can be taken from the output head in chunks (no logit transform after it)."""
    config = getattr(unwrap(model), "config", None)
    return not any(getattr(config, name, None) is not None for name in AFTER_HEAD)


def _chunk_loss(forward, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(forward(hidden).float(), target, reduction="sum")


@contextlib.contextmanager
def _head_computes_loss(head: torch.nn.Module, labels: torch.Tensor, chunk_tokens: int, result: list):
    original = head.forward
    own = "forward" in head.__dict__  # e.g. accelerate's hooks set an instance forward: put it back after

    def forward(hidden_states):
        hidden = hidden_states[:, :-1].reshape(-1, hidden_states.size(-1))
        target = labels[:, 1:].reshape(-1)
        keep = (target != IGNORE).nonzero().flatten()
        hidden, target = hidden[keep], target[keep]
        total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden_states.sum()  # stays in the graph with no target
        for s in range(0, hidden.size(0), chunk_tokens):
            h, t = hidden[s : s + chunk_tokens], target[s : s + chunk_tokens]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, original, h, t, use_reentrant=False)
            else:
                total = total + _chunk_loss(original, h, t)
        result.append(total)
        return total

    head.forward = forward
    try:
        yield
    finally:
        if own:
            head.forward = original
        else:
            del head.forward  # the class's forward shows through again


def chunked_token_loss_sum(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """token_loss_sum's value, from hidden states in chunks of `chunk_tokens` target positions."""
    head = unwrap(model).get_output_embeddings()
    result: list = []
    with _head_computes_loss(head, labels, chunk_tokens, result):
        out = model(**inputs).logits
    # equal_nan: a non-finite loss (an overflow, which DeepSpeed then skips) is still the head's own value
    if len(result) != 1 or out.dim() != 0 or not torch.allclose(out.detach(), result[0].detach(), rtol=0, atol=0, equal_nan=True):
        raise RuntimeError(
            "train.loss_chunk_tokens: this model changes its logits after the output head (e.g. logit softcapping or "
            "scaling), so the loss cannot be computed from the head in chunks. Set train.loss_chunk_tokens=0."
        )
    return out
