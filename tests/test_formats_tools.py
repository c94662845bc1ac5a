"""ShareGPT and OpenAI-style tool-call rows: golden label masks under a real chat template (Qwen2.5's,
as shipped with trl) on the built-in tokenizer, whose special tokens are Qwen's."""

import json
from pathlib import Path

import pytest
import trl

from launcher import builtin
from launcher.data.prepare import prepare
from launcher.data.tokenize import IGNORE
from launcher.errors import DataError
from launcher.model import load_tokenizer
from launcher.recipe import DataConfig, ModelConfig

QWEN25 = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Time now",
                                          "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    tok = load_tokenizer(builtin.materialize("builtin:tiny-qwen2", cache_dir), ModelConfig(path="builtin:tiny-qwen2"))
    tok.chat_template = QWEN25
    return tok


def _trained(tokenizer, row) -> list:
    """The text of each run of trained tokens."""
    runs, current = [], []
    for t, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def _prepare(tmp_path, cache_dir, tokenizer, rows, fmt="messages"):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare(DataConfig(train_files=[str(f)], format=fmt, max_seq_len=8192, shuffle=False), tokenizer, cache_dir, 0)


def test_tool_call_turns_are_trained_and_tools_reach_the_template(tmp_path, cache_dir, tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                      {"role": "tool", "content": '{"celsius": 21}'},
                      {"role": "assistant", "content": "21 C in Paris."}],
         "tools": [WEATHER]},
        {"messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "Noon."}], "tools": [CLOCK]},
    ]
    train = _prepare(tmp_path, cache_dir, tokenizer, rows).train
    assert _trained(tokenizer, train[0]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',  # the call is learned
        "21 C in Paris.<|im_end|>",  # and the answer after the tool's reply; the reply itself is not
    ]
    assert _trained(tokenizer, train[1]) == ["Noon.<|im_end|>"]
    first = tokenizer.decode(train[0]["input_ids"])
    assert '"name": "get_weather"' in first.split("<|im_start|>user")[0] and "<tool_response>\n{\"celsius\": 21}\n</tool_response>" in first
    # Arrow gives row 0's tool schema row 1's keys as nulls; they must not reach the template
    assert "zone" not in first and "null" not in first


def test_sharegpt_trains_every_gpt_turn_and_function_calls(tmp_path, cache_dir, tokenizer):
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                           {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]},
        {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                           {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                           {"from": "observation", "value": "-3"}, {"from": "gpt", "value": "-3 C."}], "tools": json.dumps([WEATHER])},
    ]
    train = _prepare(tmp_path, cache_dir, tokenizer, rows, fmt="sharegpt").train
    assert _trained(tokenizer, train[0]) == ["4<|im_end|>", "6<|im_end|>"]
    assert _trained(tokenizer, train[1]) == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>', "-3 C.<|im_end|>"]


@pytest.mark.parametrize("row, fmt, message", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{city: Paris"}}]}]},
     "messages", r"rows.jsonl, row 2: message 1, tool call 0 \(f\): `arguments` is not valid JSON"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f(city=1)"}]},
     "sharegpt", r"rows.jsonl, row 2: turn 1 \(function_call\) is not valid JSON"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, "sharegpt", r"rows.jsonl, row 2: turn 1 is from 'bot'"),
])
def test_bad_tool_rows_name_file_and_row(tmp_path, cache_dir, tokenizer, row, fmt, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]} if fmt == "messages" else \
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    with pytest.raises(DataError, match=message) as e:
        _prepare(tmp_path, cache_dir, tokenizer, [good, row], fmt=fmt)
    assert "\n" not in str(e.value)
