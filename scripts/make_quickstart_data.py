"""Writes recipes/data/quickstart/{train,eval}.jsonl: repeat a short sequence of letters.

A randomly initialised tiny model cannot know anything, so the quickstart task must be
learnable from the data alone and measurable on prompts it never saw: repeating random
four-letter sequences is both (26^4 sequences, so held-out prompts are truly unseen), and a
fixed length makes it a fixed-offset copy that a tiny model finds in a few hundred steps. Deterministic: rerunning rewrites identical files.
"""

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
OUT = Path(__file__).resolve().parent.parent / "recipes" / "data" / "quickstart"


def conversation(rng: random.Random) -> dict:
    seq = [rng.choice(LETTERS) for _ in range(4)]
    return {
        "messages": [
            {"role": "user", "content": "repeat: " + " ".join(seq)},
            {"role": "assistant", "content": " ".join(seq)},
        ]
    }


def main() -> None:
    rng = random.Random(1234)
    seen, rows = set(), []
    while len(rows) < 4200:
        row = conversation(rng)
        key = row["messages"][1]["content"]
        if key not in seen:  # held-out prompts must really be unseen
            seen.add(key)
            rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:4000]), ("eval", rows[4000:])):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
