"""Writes the sample pairs and labelled files (the text samples are written by hand).

    python configs/samples/make_samples.py      # rewrites configs/samples/{pairs,labelled}/

- ``pairs/{train,eval}.tsv``: English number words -> digits, 0-999 ("three hundred and
  twelve<TAB>3 1 2"), 800 / 200 numbers, a fixed shuffle.
- ``labelled/train.jsonl``, ``labelled/eval.csv``: short sentences about one of four
  topics (``weather``, ``sport``, ``food``, ``music``), 100 / 40 per topic; the topic
  words of the evaluation sentences are partly held out (unseen in training).
"""

from __future__ import annotations

import csv
import json
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent
UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
UNITS += ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen"]
UNITS += ["seventeen", "eighteen", "nineteen"]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """British English words of ``0 <= n < 1000``."""
    if n < 20:
        return UNITS[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + UNITS[n % 10])
    rest = n % 100
    return f"{UNITS[n // 100]} hundred" + ("" if rest == 0 else f" and {words(rest)}")


SUBJECTS = [
    "my neighbour", "the teacher", "a friend of mine", "the old man", "my sister",
    "the children", "our landlord", "the doctor", "my cousin", "everyone at work",
]  # fmt: skip
VERBS = [
    "talked about", "complained about", "wrote a letter about", "laughed at", "dreamed of",
    "told me about", "could not stop thinking about", "asked about", "argued about",
]  # fmt: skip
WHEN = ["yesterday", "on sunday", "last night", "this morning", "again", "all week", "today"]
TOPICS = {  # (training phrases, held-out phrases sharing some of their words)
    "weather": (
        ["the rain", "the storm", "a cold wind", "the snow", "the fog over the river",
         "the summer heat", "thunder in the hills", "a grey sky", "the frost on the roofs",
         "the forecast for tomorrow", "a warm breeze", "the flooded road"],
        ["a cold rain", "the snow storm", "the heat and the fog", "a grey frost"],
    ),
    "sport": (
        ["the football match", "the final score", "the marathon", "the tennis final",
         "the new goalkeeper", "the cycling race", "the referee", "a penalty kick",
         "the swimming team", "the league table", "the boxing match", "a long training run"],
        ["the tennis match", "the football referee", "a cycling team", "the final race"],
    ),
    "food": (
        ["the fresh bread", "a bowl of soup", "the roast chicken", "the cheese market",
         "the burnt onions", "a plate of pasta", "the apple pie", "the spicy stew",
         "the new bakery", "a jar of honey", "the strawberries", "the fish and chips"],
        ["the chicken soup", "a pie of apples", "the spicy pasta", "the honey bread"],
    ),
    "music": (
        ["the piano lessons", "an old song", "the jazz band", "the violin concert",
         "the church choir", "a new guitar", "the drum solo", "the opera singer",
         "the radio song", "a slow melody", "the brass band", "the school concert"],
        ["the guitar concert", "a jazz song", "the piano and the violin", "an old melody"],
    ),
}  # fmt: skip


def sentence(rng: random.Random, phrase: str) -> str:
    return f"{rng.choice(WHEN)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {phrase}"


def main() -> None:
    rng = random.Random(0)
    numbers = list(range(1000))
    rng.shuffle(numbers)
    (HERE / "pairs").mkdir(exist_ok=True)
    for name, part in (("train", numbers[:800]), ("eval", numbers[800:])):
        lines = [f"{words(n)}\t{' '.join(str(n))}\n" for n in part]
        (HERE / "pairs" / f"{name}.tsv").write_text("".join(lines))

    train, evaluation, seen = [], [], set()
    for topic, (phrases, held_out) in TOPICS.items():
        while len([e for e in train if e["label"] == topic]) < 100:
            text = sentence(rng, rng.choice(phrases))
            if text not in seen:
                seen.add(text)
                train.append({"text": text, "label": topic})
        count = 0
        while count < 40:  # half with training phrases in new sentences, half held out
            text = sentence(rng, rng.choice(phrases if count % 2 else held_out))
            if text not in seen:
                seen.add(text)
                evaluation.append({"text": text, "label": topic})
                count += 1
    rng.shuffle(train)
    rng.shuffle(evaluation)
    (HERE / "labelled").mkdir(exist_ok=True)
    with open(HERE / "labelled" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in train)
    with open(HERE / "labelled" / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(evaluation)


if __name__ == "__main__":
    main()
