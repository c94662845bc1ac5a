"""Classify a JSONL file with an exported model the way a user serves it: transformers only, no
launcher import. Prints one JSON line per model dir: {"dir", "accuracy", "predictions"}.

    python serve_classifier.py EVAL.jsonl MODEL_DIR [MODEL_DIR ...]

head sequence: AutoModelForSequenceClassification on padded batches, labels from config.id2label.
head lm: the causal LM scores each label's token ids (classification.json) after the chat-formatted
prompt and takes the most probable label.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


@torch.no_grad()
def predict_sequence(model_dir: Path, texts: list) -> list:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for i in range(0, len(texts), 8):
        batch = tokenizer(texts[i : i + 8], padding=True, return_tensors="pt")
        out += [model.config.id2label[int(k)] for k in model(**batch).logits.argmax(-1)]
    return out


@torch.no_grad()
def predict_lm(model_dir: Path, info: dict, texts: list) -> list:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        content = info["prompt"].format(text=text, labels=info["labels_in_prompt"])
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for label_ids in info["label_token_ids"]:
            ids = torch.tensor([prompt_ids + label_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            positions = range(len(prompt_ids) - 1, ids.size(1) - 1)
            scores.append(sum(float(logp[p, ids[0, p + 1]]) for p in positions))
        out.append(info["labels"][max(range(len(scores)), key=scores.__getitem__)])
    return out


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1])]
    for d in map(Path, sys.argv[2:]):
        info = json.loads((d / "classification.json").read_text())
        texts = [r[info["text_field"]] for r in rows]
        predicted = predict_sequence(d, texts) if info["head"] == "sequence" else predict_lm(d, info, texts)
        accuracy = sum(p == str(r["label"]) for p, r in zip(predicted, rows)) / len(rows)
        print(json.dumps({"dir": str(d), "accuracy": accuracy, "predictions": predicted}), flush=True)


if __name__ == "__main__":
    main()
