"""Trains the byte-level BPE tokenizer shipped in launcher/builtin/tokenizer/.

Byte-level, so any text (any language, any data a test makes) encodes; trained on the
quickstart data plus a little English so common words are single tokens. Rerun after
changing the chat template or the special tokens; the output is deterministic.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "launcher" / "builtin" / "tokenizer"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML. The {% generation %} markers let transformers (and TRL) compute assistant
# masks too; sft-launcher itself derives masks from rendered prefixes, for any template.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ENGLISH = """The quick brown fox jumps over the lazy dog. Fine-tune a small language model on
instruction data, evaluate it on held-out prompts, and export a model that serves.
Below is an instruction that describes a task. Write a response that appropriately
completes the request. What is the capital of France? Paris is the capital of France.
Translate the sentence into French. Summarise the text in one sentence. Answer yes or no.
The input, the output, the prompt and the completion. Positive negative neutral review."""


def corpus():
    for name in ("train.jsonl", "eval.jsonl"):
        for line in open(ROOT / "recipes" / "data" / "quickstart" / name):
            for m in json.loads(line)["messages"]:
                yield m["role"] + "\n" + m["content"]
    for _ in range(50):
        yield from ENGLISH.splitlines()
    yield " ".join(str(i) for i in range(1000))


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    hf.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(hf)} tokens)")


if __name__ == "__main__":
    main()
