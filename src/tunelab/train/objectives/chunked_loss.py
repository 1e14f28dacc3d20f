"""Next-token loss without the full logits: the output layer and cross-entropy chunk by chunk.

For a vocabulary of 128k tokens the float32 logits of one 16k-token batch take 8 GiB, more than
the rest of a 1B model's activations. Here the decoder runs once, and the output layer plus
cross-entropy run over ``chunk_tokens`` trained positions at a time under activation
checkpointing, so only one chunk's logits ever exist (they are recomputed in backward); a batch
with no more trained positions than one chunk skips the checkpoint. The value and the gradients equal :func:`~tunelab.train.objectives.sft.causal_lm_loss`.

It needs logits to be exactly ``output_layer(last_hidden_state)``; models that scale or cap
their logits, and PEFT prompt learning (virtual tokens), are not. :func:`chunked_loss_supported`
checks that on the real model at start-up, like the packing probe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint

from tunelab.data.packing import Batch
from tunelab.data.templates import IGNORE_INDEX
from tunelab.models.methods.prompt_learning import has_virtual_tokens


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return causal_lm.base_model, causal_lm.get_output_embeddings()


def chunked_loss_supported(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the model's logits are its output layer applied to its last hidden states (checked numerically)."""
    if has_virtual_tokens(model):  # prompt learning: the logits include the virtual tokens'
        return False
    decoder, head = _decoder_and_head(model)
    if head is None:
        return False
    ids = torch.randint(1, min(model.config.vocab_size, 1000), (1, 8), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(ids.to(device), use_cache=False).logits.float()
        direct = head(decoder(ids.to(device), use_cache=False).last_hidden_state).float()
    model.train(was_training)
    return logits.shape == direct.shape and bool(torch.allclose(logits, direct, rtol=1e-4, atol=1e-4))


def _chunk_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def chunked_token_logps(model: torch.nn.Module, inputs: dict, positions: torch.Tensor | None,
                        targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Log-prob of each target token, ``chunk_tokens`` positions at a time (no full logits).

    Args:
        inputs: the model's keyword arguments for the batch.
        positions: the single packed row's positions to score; None scores ``targets != -100``
            of every row of a padded batch, in row-major order.
        targets: the batch's targets (``[rows, width]``).

    Returns:
        One float32 log-prob per scored position.
    """
    decoder, head = _decoder_and_head(model)
    hidden = decoder(**inputs).last_hidden_state
    if positions is not None:
        hidden, targets = hidden[0, positions], targets[0, positions]
    else:
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
    if targets.shape[0] <= chunk_tokens:
        # One chunk: recomputing it in backward would save nothing (its backward comes first) and
        # cost a second pass through the output layer.
        return _chunk_token_logps(head, hidden, targets)
    return torch.cat([
        checkpoint(_chunk_token_logps, head, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                   use_reentrant=False)
        for start in range(0, targets.shape[0], chunk_tokens)
    ])


def chunked_causal_lm_loss(model: torch.nn.Module, batch: Batch, chunk_tokens: int = 4096) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's trained tokens, ``chunk_tokens`` logits at a time."""
    return -chunked_token_logps(model, batch.model_inputs(), batch.trained_positions, batch.targets,
                                chunk_tokens).sum()
