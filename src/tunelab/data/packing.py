"""Micro-batches: padding-free packed rows, or length-grouped padded batches.

Both plans are a pure function of (lengths, seed, epoch), so a resumed run rebuilds exactly the
batches of the interrupted one. Labels are shifted here, per sequence, into ``targets``
(``targets[t]`` is the token that position ``t`` must predict), so a packed row never asks the
last token of one sequence to predict the first token of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tunelab.data.templates import IGNORE_INDEX

OPEN_ROWS = 16  # rows kept open while filling: fuller rows, order still close to the shuffle


@dataclass
class Batch:
    """One micro-batch, ready for the model.

    ``attention_mask`` is None for packed rows; ``seq_lens`` then lists the sequence lengths of
    each row (for the packed attention kernel) and ``trained_positions`` the positions of the
    single row that have a target (the only ones whose logits are needed).
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    seq_lens: list[list[int]] | None
    num_tokens: int
    num_trained: int
    trained_positions: torch.Tensor | None = None
    pair_labels: torch.Tensor | None = None  # pair batches: one bool per pair (KTO: desirable)
    reference_logps: torch.Tensor | None = None  # pair batches: precomputed, one per sequence

    @property
    def num_sequences(self) -> int:
        """Sequences in the batch (a pair batch holds two per pair: first, second, first, ...)."""
        return len(self.seq_lens[0]) if self.seq_lens is not None else self.input_ids.shape[0]

    def to(self, device: torch.device) -> Batch:
        """This batch on another device."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.position_ids), move(self.attention_mask),
                     self.seq_lens, self.num_tokens, self.num_trained, move(self.trained_positions),
                     move(self.pair_labels), move(self.reference_logps))

    def model_inputs(self) -> dict:
        """Keyword arguments for the model's forward."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.seq_lens is not None:
            inputs["packed_seq_lens"] = packed_lengths_tensor(self.seq_lens)
        return inputs


def sequence_index(batch: Batch) -> torch.Tensor:
    """For a packed batch, the sequence number of every position of its single row."""
    lengths = torch.tensor(batch.seq_lens[0], device=batch.input_ids.device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def packed_lengths_tensor(seq_lens: list[list[int]]) -> torch.Tensor:
    """The ``packed_seq_lens`` model kwarg: every row's sequence lengths, flat, in a CPU int32 tensor.

    A tensor, not a list: torch.compile guards on the length of a list it sees (a compiled layer
    would recompile for every new number of sequences in a row), but only on a tensor's shape,
    which it then treats as dynamic. On the CPU, reading it back costs no device sync.
    """
    return torch.tensor([n for row in seq_lens for n in row], dtype=torch.int32)


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """``labels[1:] + [IGNORE_INDEX]``: what each position predicts, within one sequence."""
    return list(labels[1:]) + [IGNORE_INDEX]


def plan_packed(lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Group sequence indices into rows of at most ``batch_tokens`` tokens.

    Sequences are visited in a seeded shuffle and placed first-fit into one of a few open rows;
    when none has room the fullest row is closed. Sequences longer than ``batch_tokens`` must
    have been truncated before.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    rows: list[list[int]] = []
    open_rows: list[tuple[int, list[int]]] = []  # (tokens used, indices)
    for index in order.tolist():
        length = int(lengths[index])
        for slot, (used, members) in enumerate(open_rows):
            if used + length <= batch_tokens:
                members.append(index)
                open_rows[slot] = (used + length, members)
                break
        else:
            if len(open_rows) == OPEN_ROWS:
                fullest = max(range(len(open_rows)), key=lambda k: open_rows[k][0])
                rows.append(open_rows.pop(fullest)[1])
            open_rows.append((length, [index]))
    rows.extend(members for _, members in open_rows)
    return rows


def plan_padded(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort within chunks of 64 batches, shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    chunk = batch_size * 64
    batches = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: -int(lengths[i]))
        batches.extend(block[k : k + batch_size] for k in range(0, len(block), batch_size))
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def collate_packed(examples: Sequence[dict]) -> Batch:
    """Concatenate sequences into one row: positions restart at each sequence; no attention mask."""
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for example in examples:
        ids.extend(example["input_ids"])
        targets.extend(shifted_targets(example["labels"]))
        positions.extend(range(len(example["input_ids"])))
        lengths.append(len(example["input_ids"]))
    target_tensor = torch.tensor([targets])
    trained = (target_tensor[0] != IGNORE_INDEX).nonzero().squeeze(1)
    return Batch(
        input_ids=torch.tensor([ids]),
        targets=target_tensor,
        position_ids=torch.tensor([positions]),
        attention_mask=None,
        seq_lens=[lengths],
        num_tokens=len(ids),
        num_trained=len(trained),
        trained_positions=trained,
    )


def collate_padded(examples: Sequence[dict], pad_id: int) -> Batch:
    """Right-pad to the longest sequence; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    targets = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        targets[row, :n] = torch.tensor(shifted_targets(example["labels"]))
        mask[row, :n] = 1
    return Batch(
        input_ids=ids,
        targets=targets,
        position_ids=torch.arange(width).unsqueeze(0).expand(len(examples), -1).contiguous(),
        attention_mask=mask,
        seq_lens=None,
        num_tokens=int(mask.sum()),
        num_trained=int((targets != IGNORE_INDEX).sum()),
    )


def collate_pairs(examples: Sequence[dict], packing: bool, pad_id: int) -> Batch:
    """A batch of pairs: each example's two sequences side by side (first, second, first, second ...).

    ``examples`` hold ``input_ids``/``labels`` and ``pair_ids``/``pair_labels`` (see
    :mod:`tunelab.data.pair_tokenize`), a bool ``label`` and optionally precomputed
    ``reference_logps`` ``[first, second]``.
    """
    sequences = []
    for example in examples:
        sequences.append({"input_ids": example["input_ids"], "labels": example["labels"]})
        sequences.append({"input_ids": example["pair_ids"], "labels": example["pair_labels"]})
    batch = collate_packed(sequences) if packing else collate_padded(sequences, pad_id)
    batch.pair_labels = torch.tensor([bool(e["label"]) for e in examples])
    if "reference_logps" in examples[0]:
        batch.reference_logps = torch.tensor([v for e in examples for v in e["reference_logps"]], dtype=torch.float32)
    return batch
