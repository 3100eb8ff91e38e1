#!/usr/bin/env python3
"""Generate the offline quickstart dataset (configs/data/quickstart.jsonl).

Standalone and deterministic: standard library only, fixed seed. Run from anywhere:

    python configs/data/make_quickstart_data.py

Each row is an alpaca-style record {"instruction", "input", "output"} for one of four
small instruction-following skills over short sequences drawn from fixed word lists:

  * repeat the last word of a list               ("lamp river stone" -> "stone")
  * repeat the first word of a list              ("lamp river stone" -> "lamp")
  * pick the one animal out of a list of objects ("lamp tiger stone" -> "tiger")
  * classify a short review as positive/negative from its adjectives

Every (instruction, input) pair is unique, and the skills are interleaved at random, so a
random held-out slice contains only unseen combinations of familiar words: scoring it tests
whether the model learned the skill rather than memorised rows.
"""
import json
import os
import random

SEED = 1234
ROWS_PER_SKILL = {"last": 600, "first": 600, "animal": 600, "sentiment": 600}

WORDS = [  # objects (no animals)
    "apple", "river", "stone", "cloud", "lamp", "forest", "candle", "mirror",
    "garden", "rocket", "pencil", "castle", "violin", "planet", "bridge", "button",
    "window", "island", "jacket", "ladder", "orange", "pepper", "wallet", "basket",
]
ANIMALS = ["tiger", "rabbit", "turtle", "monkey", "horse", "eagle", "shark", "camel", "zebra", "otter", "mouse",
           "whale"]
NOUNS = ["food", "movie", "hotel", "book", "game", "phone", "service", "music"]
POSITIVE = ["great", "excellent", "wonderful", "amazing", "lovely", "fantastic", "superb", "delightful"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "dreadful", "poor", "disappointing", "bad"]

INSTRUCTIONS = {
    "last": "Repeat the last word.",
    "first": "Repeat the first word.",
    "animal": "Which word is an animal?",
    "sentiment": "Is this review positive or negative?",
}


def make_last(rng):
    words = rng.sample(WORDS + ANIMALS, rng.randint(3, 6))
    return " ".join(words), words[-1]


def make_first(rng):
    words = rng.sample(WORDS + ANIMALS, rng.randint(3, 6))
    return " ".join(words), words[0]


def make_animal(rng):
    words = rng.sample(WORDS, rng.randint(2, 4))
    animal = rng.choice(ANIMALS)
    words.insert(rng.randint(0, len(words)), animal)
    return " ".join(words), animal


def make_sentiment(rng):
    label = rng.choice(["positive", "negative"])
    adjs = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
    noun = rng.choice(NOUNS)
    template = rng.choice([
        "the {n} was {a} and {b}",
        "a {a} {n} , really {b}",
        "{a} {n} and {b} too",
        "this {n} is {a} , just {b}",
    ])
    return template.format(n=noun, a=adjs[0], b=adjs[1]), label


MAKERS = {"last": make_last, "first": make_first, "animal": make_animal, "sentiment": make_sentiment}


def generate(seed=SEED):
    rng = random.Random(seed)
    rows, seen = [], set()
    for skill, n in ROWS_PER_SKILL.items():
        made = 0
        while made < n:
            inp, out = MAKERS[skill](rng)
            key = (skill, inp)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"instruction": INSTRUCTIONS[skill], "input": inp, "output": out})
            made += 1
    rng.shuffle(rows)
    return rows


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.jsonl")
    rows = generate()
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
