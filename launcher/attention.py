"""Attention for packed rows: each example attends only to itself, and no work is spent across examples.

A packed micro-batch is one row of several examples, with `position_ids` restarting at 0 for
each and `cu_seq_lens_q/k` (the examples' boundaries, as TRL and flash-attention use them)
passed to the model; it carries no 2-D attention mask, which would switch transformers'
packed-row detection off and let sdpa attend across examples (DESIGN.md, known traps).

On GPU, transformers' own varlen flash-attention path (flash_attention_2/3, kernels-hub flash
kernels) reads those kwargs. For sdpa and eager, transformers would build a block-diagonal
[T x T] mask and still compute every masked score, so here two attention functions are
registered with transformers' AttentionInterface, `sft_sdpa` and `sft_eager`: on a packed row
they run sdpa (or eager math) once per example segment; on anything else (padded eval batches,
generation with a KV cache) they behave as sdpa and eager do. Their mask functions return no
mask when no padding mask is given, so the [T x T] mask is never built.
"""

from __future__ import annotations

from typing import List, Optional

import torch

# What each backend becomes when packing is on; None is transformers' default (sdpa).
PACKED = {None: "sft_sdpa", "sdpa": "sft_sdpa", "eager": "sft_eager"}
# Kept as they are: transformers passes packed rows to them as varlen kernels or block masks.
VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")


def packs_cleanly(name: Optional[str]) -> bool:
    """Whether `model.attn_implementation` keeps the examples of a packed row apart."""
    if name in PACKED or name in VARLEN:
        return True
    # kernels-hub flash kernels (e.g. kernels-community/flash-attn2) take the same varlen path
    return isinstance(name, str) and "/" in name and "flash" in name.split("/")[-1]


def for_training(name: Optional[str], packing: bool) -> Optional[str]:
    """The attn_implementation the training model is built with."""
    if not packing:
        return name
    register()
    return PACKED.get(name, name)


def segments(kwargs: dict, length: int) -> Optional[List[int]]:
    """Example boundaries [0, ..., length] in a packed row, or None for an ordinary row."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        bounds = [int(x) for x in cu.tolist()]
    else:
        pos = kwargs.get("position_ids")
        if pos is None or pos.shape[0] != 1 or pos.shape[-1] != length:
            return None
        starts = (torch.diff(pos[0], prepend=pos[0, :1] - 1) != 1).nonzero().flatten().tolist()
        bounds = starts + [length]
    if len(bounds) <= 2:
        return None
    if bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(f"cu_seq_lens {bounds} do not cover the packed row of {length} tokens")
    return bounds


def _segment_mask(n: int, window: Optional[int], device) -> Optional[torch.Tensor]:
    """Causal (and sliding-window) boolean mask of one example, None where sdpa's is_causal suffices."""
    if not window or n <= window:
        return None
    i = torch.arange(n, device=device)
    return ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window))[None, None]


def _eager(module, q, k, v, mask, dropout, scaling):
    """transformers' eager attention (softmax in float32), on one example; `mask` is boolean or None."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    n = q.shape[2]
    if mask is None:
        i = torch.arange(n, device=q.device)
        mask = (i[:, None] >= i[None, :])[None, None]
    w = torch.matmul(q, k.transpose(2, 3)) * scaling
    w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous()


def _per_segment(base: str, module, query, key, value, bounds, dropout, scaling, window):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        mask = _segment_mask(e - s, window, query.device)
        if base == "sdpa":
            outs.append(sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=True)[0])
        else:
            outs.append(_eager(module, q, k, v, mask, dropout, scaling))
    return torch.cat(outs, dim=1)


def _attention(base: str):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        n = query.shape[2]
        scaling = module.scaling if scaling is None else scaling
        if attention_mask is None and key.shape[2] == n:
            # No padding mask, no cache: a packed row (segments) or one whole sequence.
            for unsupported in ("softcap", "s_aux"):
                if kwargs.get(unsupported) is not None:
                    raise ValueError(f"sft_{base} attention does not support `{unsupported}`; use model.attn_implementation "
                                     "flex_attention or flash_attention_2, or data.packing: false")
            bounds = segments(kwargs, n) or [0, n]
            return _per_segment(base, module, query, key, value, bounds, dropout, scaling, kwargs.get("sliding_window")), None
        if attention_mask is not None and segments(kwargs, n) is not None:
            # A padding mask with packed rows is the contamination bug this module exists to prevent.
            raise ValueError("a packed row reached attention with an attention mask: its examples would attend to each other")
        if base == "sdpa":
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        mask = attention_mask
        if mask is None:  # new tokens over a cache, no padding: they see everything before them
            q_pos = torch.arange(key.shape[2] - n, key.shape[2], device=query.device)
            mask = (q_pos[:, None] >= torch.arange(key.shape[2], device=query.device)[None, :])[None, None]
        return _eager(module, query, key, value, mask[:, :, :, : key.shape[2]], dropout, scaling), None

    attention.__name__ = f"sft_{base}_attention"
    return attention


def _mask(base: str):
    def mask(*args, **kwargs):
        from transformers.masking_utils import sdpa_mask

        if kwargs.get("attention_mask") is None:
            # No padding: a packed row needs no [T x T] mask (the attention splits it), an ordinary one is causal.
            return None
        # Boolean masks (True where attended) for both bases; eager needs one even where sdpa's is_causal would do.
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": base == "sdpa" and kwargs.get("allow_is_causal_skip", True)})

    return mask


def register() -> None:
    """Make `sft_sdpa` and `sft_eager` known to transformers (idempotent; every process that builds a model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for base in ("sdpa", "eager"):
        name = f"sft_{base}"
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _attention(base))
            AttentionMaskInterface.register(name, _mask(base))
