"""``packed_sdpa``: attention for padding-free packed rows without a quadratic block mask.

transformers handles packed rows (``position_ids`` restarting per sequence, no attention mask) by
building a dense block-causal mask over the whole row, so attention costs ``row_length**2`` and
the mask as much memory. ``packed_sdpa`` instead runs causal SDPA on each sequence of the row
(cost: the sum of ``length**2``) and is registered through transformers' public attention and
mask interfaces. Anything that is not a packed training row (padding masks, KV-cache decoding)
goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Lengths of the sequences in each packed row, found where positions restart."""
    rows = []
    for row in position_ids.tolist():
        starts = [k for k, p in enumerate(row) if k == 0 or p != row[k - 1] + 1]
        rows.append([end - start for start, end in zip(starts, starts[1:] + [len(row)])])
    return rows


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention per packed sequence; transformers' SDPA for everything else.

    ``packed_seq_lens`` (one list of lengths per row, passed as a model kwarg by the engine)
    avoids reading ``position_ids`` back from the device; without it they are derived.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or q_len != kv_len or q_len == 1 or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    lengths = kwargs.get("packed_seq_lens") or segment_lengths(position_ids.expand(query.shape[0], -1))
    rows = []
    for row, row_lengths in enumerate(lengths):
        # split (not slicing): its backward is one concatenation, not a full-size zero tensor per piece.
        pieces = [
            sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling)[0]
            for q, k, v in zip(
                query[row : row + 1].split(row_lengths, dim=2),
                key[row : row + 1].split(row_lengths, dim=2),
                value[row : row + 1].split(row_lengths, dim=2),
            )
        ]
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]), None


def packed_sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    """No mask for a training row without padding (packed or not); the SDPA mask otherwise."""
    if kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset"):
        return None
    return sdpa_mask(*args, **kwargs)


def register_packed_sdpa() -> str:
    """Register ``packed_sdpa`` with transformers (idempotent) and return its name."""
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME
