"""Tokenized examples of random ids for packing and engine tests (no tokenizer needed)."""

from __future__ import annotations

import torch

from tunelab.data.templates import IGNORE_INDEX


def random_examples(count: int, vocab: int, seed: int = 0) -> list[dict]:
    """``count`` seeded examples of 5 to 39 ids below ``vocab``, the first half of each masked from the labels."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(5, 40, (1,), generator=generator))
        ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        examples.append({"input_ids": ids, "labels": labels})
    return examples
