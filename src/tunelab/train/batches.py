"""The run's micro-batches: which dataset rows go together, and how they become tensors.

A plan is a pure function of (lengths, seed, epoch), so a resumed run rebuilds exactly the
micro-batches of the interrupted one. Rows are single sequences (SFT, pretraining) or pairs of
sequences (preference objectives, KTO).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import datasets

from tunelab.data.packing import Batch, collate_packed, collate_padded, collate_pairs, plan_packed, plan_padded


class MicroBatches:
    """The run's stream of micro-batches: micro-batch ``m`` is fixed by (seed, m) alone."""

    def __init__(self, dataset: datasets.Dataset, packing: bool, batch_tokens: int, batch_size: int,
                 pad_id: int, seed: int) -> None:
        self.dataset = dataset
        self.lengths = row_lengths(dataset)
        self.packing, self.batch_tokens, self.batch_size = packing, batch_tokens, batch_size
        self.pad_id, self.seed = pad_id, seed
        self._plans: dict[int, list[list[int]]] = {}
        self._sizes: dict[int, int] = {}  # micro-batches per epoch: packing can give each epoch a different count

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {  # only the current epoch's plan is kept
                epoch: plan_packed(self.lengths, self.batch_tokens, self.seed, epoch)
                if self.packing
                else plan_padded(self.lengths, self.batch_size, self.seed, epoch)
            }
            self._sizes[epoch] = len(self._plans[epoch])
        return self._plans[epoch]

    def _size(self, epoch: int) -> int:
        return self._sizes[epoch] if epoch in self._sizes else len(self._plan(epoch))

    def locate(self, m: int) -> tuple[int, int]:
        """``(epoch, index within the epoch)`` of micro-batch ``m`` of the run."""
        epoch = 0
        while m >= self._size(epoch):
            m -= self._size(epoch)
            epoch += 1
        return epoch, m

    def count(self, epochs: float) -> int:
        """Micro-batches in the first ``epochs`` epochs (a fraction takes part of the last one)."""
        whole = int(epochs)
        return sum(self._size(e) for e in range(whole)) + math.ceil((epochs - whole) * self._size(whole))

    def progress(self, m: int) -> float:
        """Epochs done after ``m`` micro-batches, e.g. 1.5."""
        epoch, index = self.locate(m)
        return epoch + index / self._size(epoch)

    def get(self, m: int) -> Batch:
        """Micro-batch number ``m`` of the run (epochs follow each other)."""
        epoch, index = self.locate(m)
        return collate(self.dataset, self._plan(epoch)[index], self.packing, self.pad_id)


def row_lengths(dataset: datasets.Dataset) -> list[int]:
    """Tokens per dataset row (both sequences of a pair row)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    if "pair_ids" in dataset.column_names:
        lengths = [n + len(ids) for n, ids in zip(lengths, dataset["pair_ids"])]
    return lengths


def collate(dataset: datasets.Dataset, indices: Sequence[int], packing: bool, pad_id: int) -> Batch:
    """Build a batch from dataset rows (sequences, or pairs of sequences)."""
    columns = dataset[list(indices)]
    if "pair_ids" in columns:
        names = list(columns)
        return collate_pairs([dict(zip(names, values)) for values in zip(*columns.values())], packing, pad_id)
    examples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)


def eval_batches(dataset: datasets.Dataset, packing: bool, batch_tokens: int, batch_size: int, pad_id: int) -> list[Batch]:
    """Held-out batches in file order (evaluation sums over all of them, so order does not matter)."""
    groups: list[list[int]] = []
    used = 0
    for index, length in enumerate(row_lengths(dataset)):
        full = bool(groups) and (used + length > batch_tokens if packing else len(groups[-1]) >= batch_size)
        if not groups or full:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return [collate(dataset, group, packing, pad_id) for group in groups]
