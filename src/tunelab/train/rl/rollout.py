"""Rollouts: completions sampled from the current policy, and the per-token numbers RL needs.

:func:`generate_rollouts` samples ``num_samples`` completions per prompt with batched
``model.generate`` (left padding, KV cache). :func:`collate_rollouts` lays prompt + completion
out as right-padded rows for training (:class:`~tunelab.models.logprobs.RolloutBatch`), which
:func:`~tunelab.models.logprobs.forward_tokens` scores: every completion token's log-prob (in
float32), the entropy of the distribution it was drawn from and, for a critic, the last hidden state.

Prompts come already rendered and tokenized (``render_prompt`` + the tokenizer, without extra
special tokens), so rollouts see exactly the tokens inference sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.models.logprobs import RolloutBatch


@dataclass
class Rollouts:
    """Sampled completions, one entry per sample; the samples of a prompt are consecutive.

    Attributes:
        prompt_index: which prompt (index into the ``prompt_ids`` given) each sample answers.
        prompt_ids: the prompt's token ids.
        completion_ids: the generated ids, cut after the first stop id (which is kept).
        finished: True when the completion ended with a stop id, False when it ran into
            ``max_new_tokens``.
        num_samples: samples per prompt (GRPO's group size).
    """

    prompt_index: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    num_samples: int = 1

    def __len__(self) -> int:
        return len(self.completion_ids)

    def completion_lengths(self) -> list[int]:
        """Tokens generated for each sample."""
        return [len(ids) for ids in self.completion_ids]


def _generation_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model whose ``generation_config`` ``generate`` reads (under PEFT too)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _sampling_config(
    max_new_tokens: int, temperature: float, top_p: float, stop_ids: set[int], pad_id: int
) -> GenerationConfig:
    """A generation config that samples from the policy itself: only temperature and top-p.

    transformers fills every unset option from the model's ``generation_config.json`` and then
    from global defaults (``top_k=50``); both would change the distribution the log-probs are
    computed for, so top-k is switched off here and the model's own config is hidden while
    generating (see :func:`generate_rollouts`).
    """
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=pad_id,
        use_cache=True,
    )


def _cut_at_stop(ids: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1], True
    return ids, False


def generate_rollouts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: set[int],
    seed: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Rollouts:
    """Sample ``num_samples`` completions for every prompt with the current policy.

    Prompts are repeated ``num_samples`` times (samples of a prompt stay consecutive), cut into
    batches of ``batch_size`` sequences, left-padded and generated with the KV cache. Sampling
    uses only ``temperature`` and ``top_p``: top-k, repetition penalties and other options from
    the model's ``generation_config.json`` are ignored, so the samples come from the distribution
    :func:`~tunelab.models.logprobs.forward_tokens` scores (with the same temperature). The global
    RNG is left as it was: sampling draws from its own stream seeded by ``seed``, so the same seed, prompts and
    batch size give the same samples. The model is put in eval mode (no dropout) and restored.
    Works on a PEFT model (the active adapters generate).

    Args:
        model: a causal LM, or a PEFT model around one.
        tokenizer: its tokenizer (gives the pad id).
        prompt_ids: token ids of each rendered prompt.
        num_samples: completions per prompt.
        max_new_tokens: longest completion.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling mass (1 keeps the whole distribution).
        stop_ids: ids that end a completion (EOS and end-of-turn ids).
        seed: sampling seed.
        batch_size: sequences per ``generate`` call.
        on_batch: called with the number of samples finished after each batch (progress bars).

    Returns:
        The :class:`Rollouts`, ordered prompt by prompt.

    Raises:
        ValueError: no pad token, or a non-positive count.
    """
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples, batch_size and max_new_tokens must be positive "
                         f"(got {num_samples}, {batch_size}, {max_new_tokens})")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; load it with tunelab.models.load.load_tokenizer")
    stop_ids = set(stop_ids)
    config = _sampling_config(max_new_tokens, temperature, top_p, stop_ids, pad_id)
    device = next(model.parameters()).device
    expanded = [(index, list(prompt)) for index, prompt in enumerate(prompt_ids) for _ in range(num_samples)]
    rollouts = Rollouts(num_samples=num_samples)

    hf_model = _generation_model(model)
    own_config, hf_model.generation_config = hf_model.generation_config, GenerationConfig()
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(expanded), batch_size):
                chunk = expanded[start : start + batch_size]
                width = max(len(prompt) for _, prompt in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (_, prompt) in enumerate(chunk):
                    input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                    attention_mask[row, width - len(prompt) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
                )
                for (index, prompt), generated in zip(chunk, output[:, width:].tolist()):
                    completion, finished = _cut_at_stop(generated, stop_ids)
                    rollouts.prompt_index.append(index)
                    rollouts.prompt_ids.append(prompt)
                    rollouts.completion_ids.append(completion)
                    rollouts.finished.append(finished)
                if on_batch is not None:
                    on_batch(len(chunk))
    finally:
        hf_model.generation_config = own_config
        model.train(was_training)
    return rollouts


def collate_rollouts(
    rollouts: Rollouts, pad_id: int, indices: Sequence[int] | None = None
) -> RolloutBatch:
    """Right-padded prompt + completion rows for the samples ``indices`` (all by default).

    Each row is its prompt followed directly by its completion (no padding in between), so
    position ids simply count from 0 and the same model forward serves policy, reference and
    critic.
    """
    chosen = range(len(rollouts)) if indices is None else indices
    rows = [(rollouts.prompt_ids[i], rollouts.completion_ids[i]) for i in chosen]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :length] = 1
        completion_mask[row, len(prompt) : length] = 1
    position_ids = torch.arange(width, dtype=torch.long).expand(len(rows), width).clone()
    return RolloutBatch(input_ids, attention_mask, position_ids, completion_mask)
