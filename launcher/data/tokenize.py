"""Token ids and labels for one example, with loss only where the model should learn.

Conversations: the assistant spans are found by rendering the chat template on growing
prefixes of the conversation (works for any template, with or without generation
markers), then mapped onto tokens with the tokenizer's character offsets. Each span
ends with the template's end-of-turn token, which is trained: a model that never sees
a loss on it never learns to stop.

Prompt/completion: the completion and an appended EOS are trained, the prompt is not.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Tuple

from launcher.errors import DataError

IGNORE = -100


class TemplateError(ValueError):
    """The chat template cannot be split into turns the way training needs."""


def render(tokenizer, messages: List[dict], add_generation_prompt: bool = False, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: List[dict], tools=None) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the [start, end) characters of each assistant turn (replies and
    tool calls alike); `tools`: the tool schemas the template shows the model."""
    full = render(tokenizer, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        # The last turn's prefix is the whole conversation: one render fewer for the usual single reply.
        through = full if i + 1 == len(messages) else render(tokenizer, messages[: i + 1], tools=tools)
        eos = tokenizer.eos_token or ""
        if not full.startswith(through) and eos and through.endswith(eos) and full.startswith(through[: -len(eos)]):
            through = through[: -len(eos)]  # templates like Phi-3's end the whole conversation with EOS, so each prefix does too
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                "the chat template renders a conversation differently from its prefixes (it rewrites earlier turns), "
                "so assistant turns cannot be located; use a template that renders turns append-only"
            )
        # Trailing whitespace after the end-of-turn token is formatting, not something to predict.
        end = len(through.rstrip())
        spans.append((len(before), end))
    return full, spans


def tokenize_conversation(tokenizer, messages: List[dict], tools=None) -> Dict[str, List[int]]:
    return tokenize_rendered(tokenizer, [assistant_spans(tokenizer, messages, tools)])[0]


def tokenize_rendered(tokenizer, rendered: List[Tuple[str, List[Tuple[int, int]]]]) -> List[Dict[str, List[int]]]:
    """Conversations rendered by assistant_spans, tokenized in one batched (Rust-parallel) call."""
    if not rendered:
        return []
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [_mask_spans(ids, offsets, spans) for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]


def _mask_spans(ids: List[int], offsets, spans) -> Dict[str, List[int]]:
    labels = [IGNORE] * len(ids)
    # The final reply's tokens, for exact-match evaluation by generation.
    last = (0, 0)
    starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
    if starts == sorted(starts) and ends == sorted(ends):
        # Offsets in order (as fast tokenizers give them): a span's tokens are one slice, found by bisection.
        for s, e in spans:
            lo, hi = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)  # any overlap: b > s and a < e
            if lo < hi:
                labels[lo:hi] = ids[lo:hi]
                last = (lo, hi)
        return {"input_ids": ids, "labels": labels, "reply_start": last[0], "reply_end": last[1]}
    for s, e in spans:
        first = None
        for t, (a, b) in enumerate(offsets):
            if b > s and a < e:  # any overlap: a token straddling the span start is trained, as in TRL
                labels[t] = ids[t]
                first = t if first is None else first
                last = (first, t + 1)
    return {"input_ids": ids, "labels": labels, "reply_start": last[0], "reply_end": last[1]}


def tokenize_completion(tokenizer, prompt: str, completion: str) -> Dict[str, List[int]]:
    # Tokenised apart and concatenated, so the prompt/completion boundary is a token boundary.
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return {"input_ids": ids, "labels": labels, "reply_start": len(prompt_ids), "reply_end": len(ids)}


def too_long_status(file: str, index: int, n: int, max_len: int, too_long: str) -> str:
    """A row of `n` tokens is over data.max_seq_len: its status under data.too_long (error raises)."""
    if too_long == "error":
        raise DataError(
            f"{file}, row {index + 1}: {n} tokens is longer than data.max_seq_len={max_len}. "
            "Raise data.max_seq_len, or set data.too_long to truncate or drop."
        )
    return "dropped_too_long" if too_long == "drop" else "truncated"


def end_of_turn_check(tokenizer, sample_messages: List[dict]) -> str:
    """The token that closes assistant turns; raises TemplateError when it is not a special token."""
    enc = tokenize_conversation(tokenizer, sample_messages)
    closing = enc["input_ids"][enc["reply_end"] - 1]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if closing not in special:
        raise TemplateError(
            f"the chat template closes assistant turns with {tokenizer.decode([closing])!r}, not a special "
            "end-of-turn token, so a fine-tuned model would not learn when to stop"
        )
    return tokenizer.convert_ids_to_tokens(closing)
