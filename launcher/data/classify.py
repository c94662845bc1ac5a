"""Classification rows: a text and a label become token ids, for either head.

head lm: the text fills `task.prompt`, which becomes the user turn (rendered with the chat
template) or, without a template, plain text followed by " LABEL" and EOS. The label's
tokens plus the token that closes the turn are the only targets; predicting scores each
label's token sequence after the prompt, so a prediction is always one of the labels. The
prompt and the label are tokenised apart and concatenated, exactly as at prediction time.

head sequence: the text alone, tokenised with the tokenizer's special tokens; the class id
is the target of a classification head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from launcher.data.tokenize import IGNORE, TemplateError, assistant_spans, too_long_status
from launcher.errors import DataError


@dataclass(frozen=True)
class Classes:
    """The label set and what the heads need of it; carried from data preparation to eval and export."""

    names: List[str]
    head: str
    # head lm: per label, the token ids trained and scored after the prompt (label + end-of-turn)
    completions: Optional[List[List[int]]] = None
    # head sequence: loss weight per class, in the order of `names`
    weights: Optional[List[float]] = None
    # where the names came from, for error messages
    source: str = "task.labels"


def sequence_labels(classes: Optional[Classes]) -> Optional[List[str]]:
    """The classes of a `head: sequence` run (whose model is a sequence classifier), else None."""
    return classes.names if classes is not None and classes.head == "sequence" else None


def label_value(value: Any, file: str, index: int, field: str) -> str:
    if value is None:
        raise DataError(f"{file}, row {index + 1}: missing field `{field}` (task.label_field). Every row needs a label; fix or remove the row.")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{file}, row {index + 1}: field `{field}` must be a string or an integer label, got {type(value).__name__} {value!r}.")
    text = str(value)
    if not text.strip():
        raise DataError(f"{file}, row {index + 1}: field `{field}` is empty; every row needs a label.")
    return text


def text_value(value: Any, file: str, index: int, field: str) -> str:
    if value is None:
        raise DataError(f"{file}, row {index + 1}: missing field `{field}` (task.text_field). Every row needs the text to classify; fix or remove the row.")
    if not isinstance(value, str):
        raise DataError(f"{file}, row {index + 1}: field `{field}` must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise DataError(f"{file}, row {index + 1}: field `{field}` is empty.")
    return value


def collect_labels(task, train_rows: Dict[str, Any]) -> List[str]:
    """`task.labels`, or every label in the training files (file name -> Dataset), sorted
    (numerically when every label is an integer, so 2 comes before 10)."""
    if task.labels:
        return list(task.labels)
    found = set()
    for file, rows in train_rows.items():
        if task.label_field not in rows.column_names:
            raise DataError(
                f"{file}, row 1: missing field `{task.label_field}` (task.label_field); the file's fields are "
                f"{', '.join(rows.column_names)}. Set task.label_field to the column that holds the label."
            )
        for i, value in enumerate(rows[task.label_field]):
            found.add(label_value(value, file, i, task.label_field))
    names = sorted(found, key=lambda x: (0, int(x), "") if x.lstrip("-").isdigit() else (1, 0, x))
    if len(names) < 2:
        raise DataError(
            f"every training row of {', '.join(train_rows)} has the label {names[0]!r}: a classifier needs at least two "
            "classes. Add examples of the other classes, or list them in task.labels if they are only in the eval data."
        )
    return names


def _prompt_text(task, names: List[str], text: str) -> str:
    return task.prompt.format(text=text, labels=", ".join(names))


def prompt_ids(tokenizer, task, names: List[str], text: str) -> List[int]:
    """The tokens before the label: the chat template's user turn and assistant header, or the plain prompt."""
    content = _prompt_text(task, names, text)
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(content, add_special_tokens=True)["input_ids"]


def completion_ids(tokenizer, label: str) -> List[int]:
    """The label's tokens as the model should answer them, closed by end-of-turn (or EOS)."""
    if tokenizer.chat_template:
        full, spans = assistant_spans(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": label}])
        start, end = spans[-1]
        return tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
    return tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def make_classes(task, tokenizer, names: List[str]) -> Classes:
    source = "task.labels" if task.labels else "the labels found in the training files"
    if task.head == "sequence":
        return Classes(names=names, head="sequence", weights=list(task.class_weights) or [1.0] * len(names), source=source)
    try:
        completions = [completion_ids(tokenizer, name) for name in names]
    except TemplateError as e:
        raise DataError(f"task.head lm: {e}.") from None
    seen: Dict[tuple, str] = {}
    for name, ids in zip(names, completions):
        if tuple(ids) in seen:
            raise DataError(
                f"task.labels: {seen[tuple(ids)]!r} and {name!r} tokenize to the same tokens {ids}, so the lm head cannot tell "
                "them apart. Rename one of them (or use task.head: sequence)."
            )
        seen[tuple(ids)] = name
    return Classes(names=names, head="lm", completions=completions, source=source)


def describe(classes: Classes, task, tokenizer) -> dict:
    """classification.json, saved with checkpoints and exports: what serving needs to reproduce
    training-time predictions (head lm: format `prompt`, then score each label's token ids)."""
    info = {"head": classes.head, "labels": classes.names, "text_field": task.text_field}
    if classes.head == "lm":
        info.update(prompt=task.prompt, labels_in_prompt=", ".join(classes.names), chat_template=bool(tokenizer.chat_template),
                    label_token_ids=classes.completions)
    return info


def _cut_text(tokenizer, text: str, tokens: int) -> str:
    """The start of `text` that tokenizes to at most `tokens` tokens."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: offsets[tokens - 1][1]] if tokens > 0 and offsets else ""


def tokenize_row(row: Dict, index: int, file: str, task, tokenizer, classes: Classes, max_len: int, too_long: str) -> Dict:
    """One dataset row: input_ids, class_id, status, and for head lm the token labels and prompt end."""
    text = text_value(row.get(task.text_field), file, index, task.text_field)
    label = label_value(row.get(task.label_field), file, index, task.label_field)
    if label not in classes.names:
        raise DataError(
            f"{file}, row {index + 1}: label {label!r} is not one of {classes.source} ({', '.join(classes.names)}). "
            "Fix the row, or list every class in task.labels."
        )
    class_id = classes.names.index(label)
    if classes.head == "sequence":
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        status = "ok"
        if len(ids) > max_len:
            status = too_long_status(file, index, len(ids), max_len, too_long)
            ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
        return {"input_ids": ids, "class_id": class_id, "status": status, "n_targets": 1}
    answer = classes.completions[class_id]
    prompt = prompt_ids(tokenizer, task, classes.names, text)
    status = "ok"
    longest = max(len(c) for c in classes.completions)
    if len(prompt) + longest > max_len:
        status = too_long_status(file, index, len(prompt) + longest, max_len, too_long)
        budget = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - (len(prompt) + longest - max_len)
        while budget > 0 and len(prompt) + longest > max_len:  # the template around the text stays whole
            prompt = prompt_ids(tokenizer, task, classes.names, _cut_text(tokenizer, text, budget))
            budget -= 1
        if len(prompt) + longest > max_len:
            raise DataError(f"{file}, row {index + 1}: task.prompt and the longest label need more than data.max_seq_len={max_len} tokens even with no text; raise data.max_seq_len.")
    ids = prompt + answer
    return {
        "input_ids": ids,
        "labels": [IGNORE] * len(prompt) + answer,
        "class_id": class_id,
        "reply_start": len(prompt),
        "reply_end": len(ids),
        "status": status,
        "n_targets": len(answer),
    }
