"""Build the training data of the real-model quickstart: a new identity mixed with general instructions.

Reads LLaMA-Factory's demo files in ../shared/data/llamafactory_demo (not part of tunelab):
``identity.json`` with ``{{name}}`` and ``{{author}}`` filled in, repeated ``--identity-repeat``
times, and general instructions from ``alpaca_en_demo.json`` so the model keeps what it knows.
A seeded split of the alpaca records gives a held-out general set the training never sees.

    python examples/real/prepare_data.py --out runs/real/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent.parent.parent / "shared" / "data" / "llamafactory_demo"


def identity_records(name: str, author: str) -> list[dict]:
    """identity.json with the placeholders filled in."""
    records = json.loads((DEMO / "identity.json").read_text(encoding="utf-8"))
    return [{**r, "output": r["output"].replace("{{name}}", name).replace("{{author}}", author)} for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/real/data")
    parser.add_argument("--name", default="Nova")
    parser.add_argument("--author", default="Acme Labs")
    parser.add_argument("--general", type=int, default=150, help="general instructions to train on")
    parser.add_argument("--held-out", type=int, default=20, help="general instructions held out for the loss")
    parser.add_argument("--identity-repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    identity = identity_records(args.name, args.author)
    general = json.loads((DEMO / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    rng.shuffle(general)
    # The held-out records come first, so that training on more general data never changes them.
    general_eval, general_train = general[: args.held_out], general[args.held_out: args.held_out + args.general]
    train = identity * args.identity_repeat + general_train
    rng.shuffle(train)

    asked = {r["instruction"].strip().lower() for r in identity}
    for line in (HERE / "identity_questions.jsonl").read_text(encoding="utf-8").splitlines():
        question = json.loads(line)["question"]
        if question.strip().lower() in asked:
            raise SystemExit(f"held-out identity question {question!r} is in the training data")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for file, records in (("train.jsonl", train), ("general_eval.jsonl", general_eval)):
        with (out / file).open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {out / 'train.jsonl'}: {len(identity)} identity records x {args.identity_repeat} "
          f"({args.name} by {args.author}) + {len(general_train)} general instructions")
    print(f"wrote {out / 'general_eval.jsonl'}: {len(general_eval)} held-out general instructions")


if __name__ == "__main__":
    main()
