"""Row formats: check a raw row and turn it into one of two shapes.

Every format becomes either a conversation (`{"messages": [...]}`, rendered with the
model's chat template) or a prompt/completion pair of plain strings (prompt may be "").
Errors name the file and the 1-based row so the user can open the line and fix it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from launcher.errors import DataError

FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")

# The classic Alpaca prompt, for models without a chat template.
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _fail(file: str, row: int, msg: str) -> DataError:
    return DataError(f"{file}, row {row + 1}: {msg}")


def _text(value: Any, file: str, row: int, key: str, allow_empty: bool = False) -> str:
    if value is None:
        raise _fail(file, row, f"missing field `{key}`. Every row of this format needs it; fix or remove the row.")
    if not isinstance(value, str):
        raise _fail(file, row, f"field `{key}` must be a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise _fail(file, row, f"field `{key}` is empty.")
    return value


def check_messages(messages: Any, file: str, row: int) -> list:
    if messages is None:
        raise _fail(file, row, "missing field `messages` (a list of {role, content} objects).")
    if not isinstance(messages, list) or not messages:
        raise _fail(file, row, "`messages` must be a non-empty list of {role, content} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _fail(file, row, f"message {i} must have `role` and `content`.")
        if m["role"] not in ROLES:
            raise _fail(file, row, f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}.")
        if m["role"] == "system" and i != 0:
            raise _fail(file, row, f"message {i} is a system message; only the first message may be one.")
        content = _text(m["content"], file, row, f"messages[{i}].content", allow_empty=m["role"] == "system")
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _fail(file, row, "the conversation has no assistant turn, so there is nothing to train on.")
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise _fail(file, row, "the conversation must start with a user turn (after an optional system message).")
    return out


def to_example(fmt: str, row: Dict[str, Any], file: str, index: int, has_chat_template: bool) -> Dict[str, Any]:
    """{"messages": [...]} or {"prompt": str, "completion": str}."""
    if fmt == "messages":
        return {"messages": check_messages(row.get("messages"), file, index)}
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), file, index, "instruction")
        output = _text(row.get("output"), file, index, "output")
        extra: Optional[str] = row.get("input") or None
        if extra is not None and not isinstance(extra, str):
            raise _fail(file, index, f"field `input` must be a string, got {type(extra).__name__}.")
        if has_chat_template:
            user = instruction if not extra else f"{instruction}\n\n{extra}"
            return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra) if extra else ALPACA_PROMPT.format(instruction=instruction)
        return {"prompt": prompt, "completion": output}
    if fmt == "completion":
        return {
            "prompt": _text(row.get("prompt"), file, index, "prompt", allow_empty=True),
            "completion": _text(row.get("completion"), file, index, "completion"),
        }
    if fmt == "text":
        return {"prompt": "", "completion": _text(row.get("text"), file, index, "text")}
    raise ValueError(fmt)
