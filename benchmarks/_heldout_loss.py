"""Held-out loss of a LoRA adapter on alpaca records: the "equal final loss" check of ``real_sft.py``.

Training-loss tails are not comparable across recipes that see the records in different orders
and batch shapes; the loss on the same held-out records is. Each record is chat-rendered with the
tokenizer's template; only the answer and its end-of-turn token count (as in training), and the
loss is the mean over all those tokens. Imports nothing from tunelab.

    python benchmarks/_heldout_loss.py --model DIR --adapter DIR --data records.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from _hf_baseline import IGNORE_INDEX, tokenize_record


@torch.no_grad()
def heldout_loss(model_dir: str, adapter: str | None, records: list[dict], max_length: int) -> tuple[float, int]:
    """Token-weighted mean loss over the answers of ``records``, and the number of answer tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    for record in records:
        example = tokenize_record(tokenizer, record, max_length, pad_to_max=False)
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                   reduction="sum")
        total += float(losses)
        count += int((targets != IGNORE_INDEX).sum())
    return total / count, count


def main() -> None:
    """Print ``{"loss": ..., "tokens": ...}`` for one adapter (or the base model) on the records."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", help="PEFT adapter directory (default: the base model alone)")
    parser.add_argument("--data", required=True, help="JSON list of alpaca records")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    loss, tokens = heldout_loss(args.model, args.adapter, records, args.max_length)
    print(json.dumps({"loss": loss, "tokens": tokens}))


if __name__ == "__main__":
    main()
