"""NEFTune: uniform noise on the input embeddings during training (Jain et al., 2023).

Each embedding vector of a sequence of ``L`` tokens gets noise drawn from ``U(-1, 1)`` scaled by
``alpha / sqrt(L * d)`` (``d``: the embedding size), as in the paper's reference code. ``L`` is the
length of each sequence itself: inside a padding-free packed row every sequence gets the scale of
its own length (not the row's), and in a padded batch padding positions get no noise and do not
count. Evaluation and generation (the module in eval mode) see clean embeddings.

The noise is added by a forward hook on the input embedding layer; a pre-hook on the whole model
reads the batch layout (``packed_seq_lens`` or ``attention_mask``) of each call. Both hooks are
removed with :meth:`NEFTune.remove`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tunelab.models.attention import row_lengths


def noise_scale(alpha: float, shape: torch.Size, packed_seq_lens: torch.Tensor | list[list[int]] | None,
                attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Per-position noise magnitude ``alpha / sqrt(L * d)``, shape ``(batch, length, 1)``.

    Args:
        alpha: the NEFTune alpha.
        shape: the embeddings' shape ``(batch, length, d)``.
        packed_seq_lens: the model's ``packed_seq_lens`` kwarg (sequence lengths of the packed rows).
        attention_mask: 1 for real tokens, 0 for padding, for padded batches.
        device: where the result goes.
    """
    batch, length, dim = shape
    try:
        packed = row_lengths(packed_seq_lens, batch, length) if packed_seq_lens is not None else None
    except ValueError:  # not this call's layout
        packed = None
    if packed is not None:
        rows = [
            torch.repeat_interleave(alpha / torch.sqrt(torch.tensor(row, dtype=torch.float32) * dim), torch.tensor(row))
            for row in packed
        ]
        return torch.stack(rows).to(device).unsqueeze(-1)
    if attention_mask is not None and tuple(attention_mask.shape) == (batch, length):
        mask = attention_mask.to(device=device, dtype=torch.float32)
        real = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return (alpha / torch.sqrt(real * dim) * mask).unsqueeze(-1)
    return torch.full((batch, length, 1), alpha / math.sqrt(length * dim), device=device)


class NEFTune:
    """Noisy embeddings for every training forward of ``model``.

    Args:
        model: the model the engine calls (a PEFT model or a plain transformers model).
        alpha: noise strength (the paper uses 5, 10 and 15).
    """

    def __init__(self, model: torch.nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self._layout: tuple[Any, Any] = (None, None)
        embeddings = model.get_input_embeddings()
        self._handles = [
            model.register_forward_pre_hook(self._read_layout, with_kwargs=True),
            embeddings.register_forward_hook(self._add_noise),
        ]

    def _read_layout(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._layout = (kwargs.get("packed_seq_lens"), kwargs.get("attention_mask"))

    def _add_noise(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        packed_seq_lens, attention_mask = self._layout
        scale = noise_scale(self.alpha, output.shape, packed_seq_lens, attention_mask, output.device)
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * scale.to(output.dtype)

    def remove(self) -> None:
        """Detach the hooks: the model is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
