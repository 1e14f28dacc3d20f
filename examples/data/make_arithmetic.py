"""Generate the quickstart dataset: arithmetic word problems with worked steps and a final answer.

Written for tunelab (Apache-2.0), no external source. Deterministic: the same seed writes the same
files. Records are OpenAI-style messages; the assistant shows its working and ends with
``answer: N`` so exact match can be scored on the final line.

    python examples/data/make_arithmetic.py --train 4000 --test 200
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Kira", "Leo",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara", "Zoe"]
THINGS = ["apples", "marbles", "pencils", "stickers", "books", "coins", "shells", "cards", "stamps",
          "cookies", "balloons", "crayons", "buttons", "rocks", "flowers", "candles"]
GAIN = [
    "{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?",
    "{name} had {a} {thing} and found {b} more. How many {thing} does {name} have?",
    "There are {a} {thing} in a box. {name} puts in {b} more. How many {thing} are in the box?",
]
LOSS = [
    "{name} has {a} {thing}. {name} gives away {b}. How many {thing} are left?",
    "{name} had {a} {thing} and lost {b} of them. How many {thing} does {name} have now?",
    "There are {a} {thing} on a table. {name} takes {b}. How many {thing} are still on the table?",
]
SYSTEM = "Solve the problem. Show the calculation, then give the final answer as 'answer: N'."


def make_problem(rng: random.Random) -> dict:
    """One word problem with its worked solution, as a messages record."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        question = rng.choice(GAIN).format(name=name, thing=thing, a=a, b=b)
        result, line = a + b, f"{a} + {b} = {a + b}"
    else:
        a = rng.randint(2, 18)
        b = rng.randint(1, min(9, a - 1))
        question = rng.choice(LOSS).format(name=name, thing=thing, a=a, b=b)
        result, line = a - b, f"{a} - {b} = {a - b}"
    answer = f"{line}\nanswer: {result}"
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def main() -> None:
    """Write train and test JSONL files with no question in both."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"arithmetic_train": [], "arithmetic_test": []}
    for split, count in (("arithmetic_test", args.test), ("arithmetic_train", args.train)):
        while len(splits[split]) < count:
            record = make_problem(rng)
            question = record["messages"][1]["content"]
            if question not in seen:
                seen.add(question)
                splits[split].append(record)
    for split, records in splits.items():
        path = Path(args.out) / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} records to {path}")


if __name__ == "__main__":
    main()
