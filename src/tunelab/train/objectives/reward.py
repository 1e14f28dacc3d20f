"""Reward model: a scalar head over the base, trained with the Bradley-Terry loss on pairs.

``loss = -log sigmoid(r(chosen) - r(rejected))``, where ``r`` is the score head's output at the
last token of each sequence. The model is a transformers sequence classifier with one label
(``score`` head), so the saved model (or LoRA adapter, head included) loads with
``AutoModelForSequenceClassification`` without tunelab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel

from tunelab.data.packing import Batch
from tunelab.train.objectives.base import Metrics
from tunelab.train.objectives.preference import pair_metrics
from tunelab.train.objectives.registry import ObjectiveSpec, register
from tunelab.train.objectives.sequence import first_and_second, sequence_index


def scored_positions(batch: Batch, pad_id: int | None) -> torch.Tensor:
    """Flat index (row * width + column) of the token each sequence's reward is read at.

    That is the last token of the sequence that is not the pad token, exactly where
    transformers' sequence classifiers pool, so a saved reward model scores the same in plain
    transformers (when pad equals EOS, both read the token before the trailing EOS).
    """
    ids = batch.input_ids
    flat = torch.arange(ids.numel(), device=ids.device).view(ids.shape)
    readable = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
    if batch.seq_lens is not None:
        owner = sequence_index(batch)
    else:
        readable &= batch.attention_mask.bool()
        owner = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    candidates = torch.where(readable, flat, torch.full_like(flat, -1)).flatten()
    last = torch.full((batch.num_sequences,), -1, device=ids.device, dtype=flat.dtype)
    last = last.scatter_reduce(0, owner.flatten(), candidates, reduce="amax")
    if (last < 0).any():
        raise ValueError("a sequence consists only of pad tokens")
    return last


def sequence_rewards(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reward of each sequence: the score head at the token :func:`scored_positions` picks.

    The backbone runs once over the (packed or padded) batch and only the chosen hidden states
    go through the head; transformers' own pooling (one per row) would not find sequence ends
    inside a packed row.
    """
    classifier = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = classifier.base_model(**batch.model_inputs()).last_hidden_state
    positions = scored_positions(batch, classifier.config.pad_token_id)
    return classifier.score(hidden.reshape(-1, hidden.shape[-1])[positions]).squeeze(-1).float()


class RewardObjective:
    """Bradley-Terry pairwise loss; the mean over pairs."""

    needs_reference = False
    reference = None

    def heads(self) -> dict[str, torch.nn.Module]:
        """No modules besides the model."""
        return {}

    def window_totals(self, window: Sequence[Batch]) -> dict[str, int]:
        """Pairs in the window."""
        return {"units": sum(batch.num_sequences // 2 for batch in window)}

    def loss(self, model: torch.nn.Module, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This batch's share of the window's loss; accuracy and margin of the scores."""
        chosen, rejected = first_and_second(sequence_rewards(model, batch))
        losses = -F.logsigmoid(chosen - rejected)
        metrics = pair_metrics(chosen.detach(), rejected.detach(), chosen.detach(), rejected.detach())
        metrics = {k: v for k, v in metrics.items() if k.startswith("rewards/")}
        return losses.sum() / totals["units"], metrics


register(ObjectiveSpec(
    name="reward", summary="a Bradley-Terry reward model (a score head) on preference pairs", data="pairs",
    build=lambda settings, reference, model: RewardObjective(), score_head=True))
