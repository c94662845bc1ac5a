"""`sft generate`: replies from an exported model (or a run dir's final/) for a JSONL file of prompts,
batched, with the model's chat template and stop tokens; also the loading `sft chat` shares.

Rows are `{"messages": [...]}` (rendered with the chat template, ending with the generation
prompt; a final assistant message is the reference, left out of the prompt and kept in the row)
or `{"prompt": "..."}` (plain text the model continues, tokenized as `data.format: completion`
trains it). Each output row is the input row plus `"reply"`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from launcher import generation
from launcher.errors import UserError


def model_dir(source: Path) -> Path:
    """The model directory `source` names: itself, or a run dir's final/."""
    if not source.is_dir():
        raise UserError(f"{source} is not a directory. Give an exported model directory (with config.json) or a run's output_dir.")
    if (source / "config.json").is_file():
        return source
    if (source / "adapter_config.json").is_file():
        raise UserError(f"{source} holds a LoRA adapter only. Export a merged model to generate with: `sft export RUN_DIR --out DIR` "
                        "(without --adapter-only).")
    if (source / "COMPLETE").is_file():  # a checkpoint: engine shards, not a model
        raise UserError(f"{source} is a checkpoint, not a model. Export it first: `sft export {source} --out DIR`, then give DIR.")
    if (source / "recipe.yaml").is_file() or (source / "checkpoints").is_dir():
        if (source / "final" / "config.json").is_file():
            return source / "final"
        raise UserError(f"{source} is a run dir without final/ (its exported model). Export it first: "
                        f"`sft export {source} --out {source / 'final'}` (runs with export.on_finish: true write final/ when training ends).")
    raise UserError(f"{source} has no config.json, so it is neither a Hugging Face model directory nor a run dir. "
                    "Give an exported model (e.g. RUN_DIR/final) or the run's output_dir.")


def load(source: Path, device: Optional[str] = None):
    """(model, tokenizer, device, model directory): on GPU when there is one, in the exported dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(source)
    config = json.loads((path / "config.json").read_text())
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise UserError(f"{path} is a sequence classifier ({config['architectures'][0]}); it predicts labels and does not generate text.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id works
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    return model, tokenizer, device, path


def require_template(tokenizer, path: Path, what: str) -> None:
    if not tokenizer.chat_template:
        raise UserError(
            f"{path} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja), so {what} cannot be "
            "rendered as a conversation. Add the template the model was trained with to that directory, or give prompt rows "
            '({"prompt": "..."}: plain text the model continues).'
        )


def read_prompts(path: Path) -> List[dict]:
    """The rows of a prompts file, checked; a bad row is named by file and 1-based row."""
    if not path.is_file():
        raise UserError(f"--prompts: {path} does not exist. Give a JSONL file, one {{\"messages\": [...]}} or {{\"prompt\": \"...\"}} per line.")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, row {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}). Each line must be one JSON object.") from None
        if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
            raise UserError(f'{where}: a row must be an object with either "messages" (a list of {{"role", "content"}}) or "prompt" (a string).')
        if "prompt" in row and not (isinstance(row["prompt"], str) and row["prompt"]):
            raise UserError(f'{where}: "prompt" must be a non-empty string.')
        if "messages" in row:
            msgs = row["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
            if not ok:
                raise UserError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": "..."}} objects.')
            if len(msgs) == 1 and msgs[0]["role"] == "assistant":
                raise UserError(f"{where}: the only message is the assistant's; a row needs a user message to reply to.")
        rows.append(row)
    if not rows:
        raise UserError(f"--prompts: {path} has no rows.")
    return rows


def prompt_ids(tokenizer, row: dict) -> List[int]:
    """Token ids of the prompt: the conversation (less a final assistant reply) and the generation prompt."""
    if "prompt" in row:
        ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        return ids or [tokenizer.bos_token_id or tokenizer.eos_token_id]
    messages = row["messages"]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes any special tokens


def reply_text(tokenizer, tokens: List[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def generate_file(source: Path, prompts: Path, out: Path, batch_size: int = 8, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Write `out` (JSONL, the input rows in order, each with "reply"); returns a short report."""
    if batch_size < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1, --temperature >= 0 and --top-p in (0, 1].")
    rows = read_prompts(prompts)
    model, tokenizer, device, path = load(source)
    if any("messages" in r for r in rows):
        require_template(tokenizer, path, f"the messages rows of {prompts}")
    stop = generation.stop_ids(model, tokenizer)
    ids = [prompt_ids(tokenizer, r) for r in rows]
    # Similar lengths together (less padding); written back in the file's order.
    order = sorted(range(len(rows)), key=lambda i: -len(ids[i]))
    torch.manual_seed(seed)  # once: with --temperature > 0 the whole file is one reproducible draw
    replies = [None] * len(rows)
    for chunk in generation.batched(order, batch_size):
        outs = generation.generate(model, [ids[i] for i in chunk], max_new_tokens, tokenizer.pad_token_id, stop, device, False,
                                   temperature=temperature, top_p=top_p)
        for i, tokens in zip(chunk, outs):
            replies[i] = reply_text(tokenizer, tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row, reply in zip(rows, replies):
            f.write(json.dumps({**row, "reply": reply}, ensure_ascii=False) + "\n")
    return {"rows": len(rows), "model": str(path), "device": str(device)}
