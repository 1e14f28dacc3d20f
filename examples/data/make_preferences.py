"""Generate preference data for the alignment examples from the arithmetic problems.

Written for tunelab (Apache-2.0), no external source. Deterministic. For each problem the worked,
correct answer is ``chosen`` and the same working with an arithmetic slip (a result off by 1-3)
is ``rejected``: a preference a model that already follows the format must learn by checking the
sum. Also writes KTO records (each answer alone, labelled desirable or not), and a larger pair
set for the reward model example (every training problem: a reward model must learn to check the
sum from its last token, which takes more examples than DPO's log-ratios).

    python examples/data/make_preferences.py
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent


def wrong_answer(answer: str, rng: random.Random) -> str:
    """The same working with a wrong result: ``a + b = r`` becomes ``a + b = r'`` with ``r' != r``."""
    line, final = answer.split("\n")
    result = int(final.removeprefix("answer: "))
    wrong = max(0, result + rng.choice([-3, -2, -1, 1, 2, 3]))
    if wrong == result:
        wrong = result + 1
    working = re.sub(r"= \d+$", f"= {wrong}", line)
    return f"{working}\nanswer: {wrong}"


def main() -> None:
    """Write arithmetic_prefs_{train,test}.jsonl and arithmetic_kto_train.jsonl next to this file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reward-train", type=int, default=4000,
                        help="pairs in arithmetic_reward_train.jsonl (the reward model example; its own seeded slips)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for split, count in (("train", args.train), ("test", args.test)):
        rows = []
        for line in (HERE / f"arithmetic_{split}.jsonl").read_text().splitlines()[:count]:
            messages = json.loads(line)["messages"]
            answer = messages[-1]["content"]
            rows.append({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": answer}],
                         "rejected": [{"role": "assistant", "content": wrong_answer(answer, rng)}]})
        path = HERE / f"arithmetic_prefs_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} pairs to {path}")
        if split == "train":
            feedback = [{"messages": r["prompt"] + r[side], "label": side == "chosen"}
                        for r in rows for side in ("chosen", "rejected")]
            rng.shuffle(feedback)
            (HERE / "arithmetic_kto_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in feedback))
            print(f"wrote {len(feedback)} KTO records to {HERE / 'arithmetic_kto_train.jsonl'}")
    reward_rng = random.Random(args.seed + 1)  # its own stream: the files above stay as they were
    rows = []
    for line in (HERE / "arithmetic_train.jsonl").read_text().splitlines()[:args.reward_train]:
        messages = json.loads(line)["messages"]
        answer = messages[-1]["content"]
        rows.append({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": answer}],
                     "rejected": [{"role": "assistant", "content": wrong_answer(answer, reward_rng)}]})
    path = HERE / "arithmetic_reward_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
