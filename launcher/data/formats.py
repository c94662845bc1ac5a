"""Row formats: check a raw row and turn it into one of two shapes.

Every format becomes either a conversation (`{"messages": [...]}`, rendered with the
model's chat template) or a prompt/completion pair of plain strings (prompt may be "").
Errors name the file and the 1-based row so the user can open the line and fix it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from launcher.errors import DataError

FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers; function_call turns carry a JSON {name, arguments}, observation turns the tool's reply
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}

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
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise _fail(file, row, f"message {i} must have `role` and `content` (or, from the assistant, `tool_calls`).")
        if m["role"] not in ROLES:
            raise _fail(file, row, f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}.")
        if m["role"] == "system" and i != 0:
            raise _fail(file, row, f"message {i} is a system message; only the first message may be one.")
        calls = m.get("tool_calls")
        if calls and m["role"] != "assistant":
            raise _fail(file, row, f"message {i} has `tool_calls` but role {m['role']!r}; only assistant messages call tools.")
        empty_ok = m["role"] in ("system", "tool") or bool(calls)
        content = _text(m.get("content") if m.get("content") is not None or not empty_ok else "", file, row, f"messages[{i}].content", allow_empty=empty_ok)
        msg = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = [_tool_call(c, file, row, i, j) for j, c in enumerate(calls)]
        for key in ("tool_call_id", "name"):  # a tool reply may say which call it answers
            if m["role"] == "tool" and m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        raise _fail(file, row, "the conversation has no assistant turn, so there is nothing to train on.")
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise _fail(file, row, "the conversation must start with a user turn (after an optional system message).")
    return out


def _strip_nulls(value: Any) -> Any:
    """Arrow gives every row's dicts the union of all rows' keys, the missing ones as null: drop those,
    or a tool's schema or a call's arguments would grow other rows' keys."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _tool_call(call: Any, file: str, row: int, i: int, j: int) -> dict:
    """An OpenAI-style call ({type: function, function: {name, arguments}}) with `arguments` as a dict,
    which is what chat templates render (OpenAI data has it as a JSON string)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _fail(file, row, f"message {i}, tool call {j} must be {{type: function, function: {{name, arguments}}}} with a name.")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _fail(file, row, f"message {i}, tool call {j} ({fn['name']}): `arguments` is not valid JSON ({e.msg} at character {e.pos}: {args[:60]!r}). "
                        "Write the arguments as a JSON object (a string of JSON or a mapping).") from None
    args = _strip_nulls(args) if args is not None else {}
    if not isinstance(args, dict):
        raise _fail(file, row, f"message {i}, tool call {j} ({fn['name']}): `arguments` must be a JSON object, got {type(args).__name__}.")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call, dict) and call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _tools(value: Any, file: str, row: int) -> Optional[list]:
    """The row's `tools` column (JSON schemas, or a JSON string of them), for the chat template."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise _fail(file, row, f"field `tools` is a string but not valid JSON ({e.msg} at character {e.pos}).") from None
    if value is not None and not isinstance(value, list):
        raise _fail(file, row, f"field `tools` must be a list of tool (function) schemas, got {type(value).__name__}.")
    return _strip_nulls(value) or None


def sharegpt_messages(conversations: Any, file: str, row: int) -> list:
    """ShareGPT `conversations` ({from, value}; human/gpt/system, function_call/observation) as messages."""
    if not isinstance(conversations, list) or not conversations:
        raise _fail(file, row, "`conversations` must be a non-empty list of {from, value} objects (ShareGPT).")
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _fail(file, row, f"turn {i} of `conversations` must have `from` and `value`.")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise _fail(file, row, f"turn {i} is from {turn['from']!r}; ShareGPT speakers are {', '.join(SHAREGPT_ROLES)}.")
        if turn["from"] == "function_call":
            out.append({"role": "assistant", "tool_calls": [{"type": "function", "function": _call_json(turn["value"], file, row, i)}]})
        else:
            out.append({"role": role, "content": turn["value"]})
    return out


def _call_json(value: Any, file: str, row: int, i: int) -> dict:
    try:
        call = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise _fail(file, row, f"turn {i} (function_call) is not valid JSON ({e.msg} at character {e.pos}); it must be {{\"name\": ..., \"arguments\": {{...}}}}.") from None
    if not isinstance(call, dict):
        raise _fail(file, row, f"turn {i} (function_call) must be a JSON object {{name, arguments}}.")
    return call


def to_example(fmt: str, row: Dict[str, Any], file: str, index: int, has_chat_template: bool) -> Dict[str, Any]:
    """{"messages": [...], "tools": [...] | None} or {"prompt": str, "completion": str}."""
    if fmt == "messages":
        return {"messages": check_messages(row.get("messages"), file, index), "tools": _tools(row.get("tools"), file, index)}
    if fmt == "sharegpt":
        if row.get("conversations") is None:
            raise _fail(file, index, "missing field `conversations` (ShareGPT: a list of {from, value}); map another column with `columns: {conversations: NAME}`.")
        messages = check_messages(sharegpt_messages(row["conversations"], file, index), file, index)
        return {"messages": messages, "tools": _tools(row.get("tools"), file, index)}
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
