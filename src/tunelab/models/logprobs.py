"""Log-probabilities of tokens under a model: what training, scoring and evaluation read from it.

- :func:`sequence_logps`: the summed log-prob of each sequence's labelled tokens in a packed or
  padded :class:`~tunelab.data.packing.Batch` (preference objectives score whole continuations:
  ``log pi(y | x)``), and :func:`reference_logps` the same under a frozen reference (or the LoRA
  policy with its adapters off). In a packed row only the labelled positions go through the output
  layer (``logits_to_keep``), and each position's log-prob is added to its own sequence.
- :func:`chunked_token_logps`: token log-probs without the full logits. For a vocabulary of 128k
  tokens the float32 logits of one 16k-token batch take 8 GiB, more than the rest of a 1B model's
  activations. Here the decoder runs once, and the output layer plus cross-entropy run over
  ``chunk_tokens`` positions at a time under activation checkpointing, so only one chunk's logits
  ever exist (they are recomputed in backward); a batch with no more positions than one chunk skips
  the checkpoint. It needs logits to be exactly ``output_layer(last_hidden_state)``; models that
  scale or cap their logits, and PEFT prompt learning (virtual tokens), are not:
  :func:`chunked_loss_supported` checks that on the real model at start-up, like the packing probe.
- :func:`forward_tokens`: one forward over prompt + completion rows (:class:`RolloutBatch`, online
  RL's rollouts) giving every completion token's log-prob, the entropy of the distribution it was
  drawn from and, for a critic, the last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint

from tunelab.data.packing import Batch, sequence_index
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


def sequence_logps(model: torch.nn.Module, batch: Batch,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's labelled tokens, and how many tokens that is.

    ``chunk_tokens``: run the output layer over that many labelled positions at a time
    (:func:`chunked_token_logps`), so the logits of the
    whole batch never exist; None: all at once.

    Returns:
        ``(logps, counts)``, both ``[num_sequences]``; logps in float32.
    """
    inputs, targets = batch.model_inputs(), batch.targets
    if batch.trained_positions is not None:  # one packed row
        positions = batch.trained_positions
        if chunk_tokens:
            token_logps = chunked_token_logps(model, inputs, positions, targets, chunk_tokens)
        else:
            inputs["logits_to_keep"] = positions
            logits = model(**inputs).logits[0]
            token_logps = -F.cross_entropy(logits.float(), targets[0, positions], reduction="none")
        owner = sequence_index(batch)[positions]
    elif chunk_tokens:
        token_logps = chunked_token_logps(model, inputs, None, targets, chunk_tokens)  # row-major labelled positions
        rows = torch.arange(targets.shape[0], device=targets.device)
        owner = torch.repeat_interleave(rows, (targets != IGNORE_INDEX).sum(dim=1))
    else:
        logits = model(**inputs).logits
        token_logps = -F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(targets.shape)
        return token_logps.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)
    # Summed in float64: index_add adds a ~1,000-token sequence one term at a time, and float32 drifted
    # by ~1e-6 relative (1e-4 in a DPO loss) where a tree-reduced .sum() does not.
    count = batch.num_sequences
    logps = torch.zeros(count, device=token_logps.device, dtype=torch.float64).index_add(
        0, owner, token_logps.double()).float()
    return logps, torch.bincount(owner, minlength=count)


def reference_logps(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: Batch,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """Log-probs of each sequence under the reference model, without gradient.

    Precomputed values travel with the batch. Otherwise the reference is the frozen copy when
    there is one, or, for a LoRA policy, the same model with its adapters switched off (no
    second copy in memory).
    """
    if batch.reference_logps is not None:
        return batch.reference_logps
    with torch.no_grad():
        if reference is not None:
            return sequence_logps(reference, batch, chunk_tokens)[0]
        if not isinstance(policy, PeftModel):
            raise RuntimeError("a reference model is needed: the policy has no adapters to switch off")
        with policy.disable_adapter():
            return sequence_logps(policy, batch, chunk_tokens)[0]


@dataclass
class RolloutBatch:
    """Prompt + completion rows, right-padded, ready for the model.

    Attributes:
        input_ids: ``[B, T]`` prompt then completion, then padding.
        attention_mask: ``[B, T]`` 1 on real tokens.
        position_ids: ``[B, T]`` 0, 1, 2, ... from each row's first token.
        completion_mask: ``[B, T]`` 1 on the completion tokens (the actions), 0 on prompt and padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device: torch.device | str) -> RolloutBatch:
        """This batch on another device."""
        return RolloutBatch(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.attention_mask, self.position_ids, self.completion_mask)))


@dataclass
class TokenStats:
    """Per-token outputs of one forward over a :class:`RolloutBatch`, aligned with ``input_ids``.

    Attributes:
        logprobs: ``[B, T]`` float32 log-prob of each completion token, 0 elsewhere.
        entropy: ``[B, T]`` float32 entropy of the distribution each completion token was drawn
            from, 0 elsewhere; None unless asked for.
        hidden: ``[B, T, H]`` last hidden states (after the final norm); None unless asked for.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def forward_tokens(
    model: torch.nn.Module,
    batch: RolloutBatch,
    temperature: float = 1.0,
    entropy: bool = False,
    hidden: bool = False,
) -> TokenStats:
    """One forward over a rollout batch: per-token log-probs (and entropy, hidden states).

    Token ``t`` is scored by the logits at ``t - 1``. Only the positions from the earliest
    completion token's predecessor onwards go through the output layer (``logits_to_keep``);
    logits are divided by ``temperature`` (the one rollouts were sampled with, as TRL does) and
    turned into log-probs in float32. Gradients flow when called outside ``torch.no_grad``.

    Args:
        model: the policy (or the reference model; a PEFT model with adapters disabled too).
        batch: from :func:`collate_rollouts`, on the model's device.
        temperature: sampling temperature (0 counts as 1: greedy decoding has no temperature).
        entropy: also compute each completion token's distribution entropy.
        hidden: also return the last hidden states (for a value head).

    Returns:
        :class:`TokenStats` aligned with ``batch.input_ids``.
    """
    mask = batch.completion_mask
    width = mask.shape[1]
    has_tokens = mask.any(dim=1)
    if has_tokens.any():
        first_completion = int(torch.where(has_tokens, mask.argmax(dim=1), width).min())
    else:
        first_completion = width
    first_needed = max(first_completion - 1, 0)
    keep = width - first_needed  # logits for positions first_needed .. width - 1
    output = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
        use_cache=False, logits_to_keep=keep, output_hidden_states=hidden,
    )
    logits = output.logits[:, :-1].float()  # predicts tokens first_needed + 1 .. width - 1
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, first_needed + 1 :]
    target_mask = mask[:, first_needed + 1 :].to(torch.float32)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    logprobs[:, first_needed + 1 :] = (picked - log_normaliser) * target_mask
    stats = TokenStats(logprobs=logprobs)
    if entropy:
        probs = torch.softmax(logits, dim=-1)
        # H = logsumexp(z) - sum(p * z); the where keeps a -inf logit (p = 0) from making NaN.
        token_entropy = log_normaliser - torch.where(probs > 0, probs * logits, 0.0).sum(dim=-1)
        stats.entropy = torch.zeros_like(logprobs)
        stats.entropy[:, first_needed + 1 :] = token_entropy * target_mask
    if hidden:
        stats.hidden = output.hidden_states[-1]
    return stats


def token_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` float32 log-prob of each completion token under ``model``, 0 elsewhere.

    See :func:`forward_tokens`; use it under ``torch.no_grad()`` for the old-policy and
    reference log-probs.
    """
    return forward_tokens(model, batch, temperature).logprobs
