"""`sft chat`: a multi-turn conversation with an exported model in the terminal, rendered with its
chat template and stopped at its end-of-turn token, as `sft generate` does."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from launcher import generation
from launcher.errors import UserError
from launcher.generate import load, prompt_ids, reply_text, require_template

HELP = "type a message and Enter; /reset starts over, /exit or Ctrl-D ends"


def chat(source: Path, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, system: Optional[str] = None) -> int:
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--max-new-tokens must be at least 1, --temperature >= 0 and --top-p in (0, 1].")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model, tokenizer, device, path = load(source)
    require_template(tokenizer, path, "a chat")
    stop = generation.stop_ids(model, tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"chatting with {path} on {device} ({HELP})", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(flush=True)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            print("(new conversation)", flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        ids = prompt_ids(tokenizer, {"messages": messages})
        tokens = generation.generate(model, [ids], max_new_tokens, tokenizer.pad_token_id, stop, device, False,
                                     temperature=temperature, top_p=top_p)[0]
        reply = reply_text(tokenizer, tokens)
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)
        if tokens and tokens[-1] not in stop:
            print(f"(stopped at --max-new-tokens {max_new_tokens})", file=sys.stderr, flush=True)
