"""Writes recipes/data/quickstart-classify/{train,eval}.jsonl: short sentences labelled with their topic.

Every sentence is a shared frame ("Yesterday I heard that ...") around one or two topic
phrases, so the label is decided by a few words anywhere in the sentence, as in real topic
data. Seeded: running it again gives the same files.
    python scripts/make_classify_data.py
"""

import json
import random
from pathlib import Path

TOPICS = {
    "sports": ["the striker scored twice", "the home team won the final", "the coach picked a new goalkeeper",
               "the marathon runners crossed the line", "the tennis match went to five sets", "the league table changed",
               "the cyclists climbed the mountain stage", "the referee showed a red card"],
    "weather": ["heavy rain is expected tonight", "the storm closed the coast road", "a warm front brings sunshine",
                "snow fell on the hills", "the wind reached sixty miles an hour", "fog delayed the morning ferries",
                "the heatwave broke records", "a cold frost covered the fields"],
    "food": ["the bakery sold fresh bread", "the chef added too much garlic", "the soup needed more salt",
             "the market had ripe tomatoes", "the new cafe serves spicy noodles", "the recipe uses brown rice",
             "the cheese was aged for a year", "the pie came out of the oven"],
    "tech": ["the phone update drains the battery", "the laptop has a faster chip", "the app crashed after login",
             "the company released a new browser", "the server farm uses less power", "the robot learned to sort parcels",
             "the software bug leaked passwords", "the camera sensor doubled in size"],
}
# The eval sentences use frames that training never shows, so no eval sentence is a training sentence.
TRAIN_FRAMES = ["{a}.", "Yesterday I heard that {a}.", "My neighbour told me {a}.", "According to the radio, {a}.",
                "It is true that {a}, and {b}.", "Nobody expected that {a}.", "Breaking: {a}.", "People say {a}; also {b}."]
EVAL_FRAMES = ["In the local paper: {a}.", "She wrote that {a}, and {b}.", "Last week {a}."]


def sentence(rng: random.Random, label: str, frames: list) -> str:
    a, b = rng.sample(TOPICS[label], 2)
    text = rng.choice(frames).format(a=a, b=b)
    return text[0].upper() + text[1:]


def write(path: Path, n: int, seed: int, frames: list) -> None:
    rng = random.Random(seed)
    labels = sorted(TOPICS)
    with open(path, "w") as f:
        for i in range(n):
            label = labels[i % len(labels)] if i < len(labels) else rng.choice(labels)
            f.write(json.dumps({"text": sentence(rng, label, frames), "label": label}) + "\n")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent / "recipes" / "data" / "quickstart-classify"
    write(here / "train.jsonl", 800, seed=1, frames=TRAIN_FRAMES)
    write(here / "eval.jsonl", 200, seed=2, frames=EVAL_FRAMES)
