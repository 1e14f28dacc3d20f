"""Batched generation with the model's chat template (used by the local generation backend and evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.templates import render_prompt


def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    conversations: Sequence[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    tools: Sequence[list[dict]] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers to conversations (each ending with the user turn to answer), in order.

    Greedy when ``temperature`` is 0; otherwise sampling seeded by ``seed`` (the same seed gives
    the same answers). Prompts are left-padded and batched; generation stops at any of the
    model's EOS ids. With ``max_prompt_tokens``, longer prompts keep their last tokens.
    ``tools`` (one list per conversation) are declared to the model as in training.
    ``on_batch`` is called with the number of prompts answered after each batch (progress bars).
    """
    model.eval()
    declared = tools if tools is not None else [[]] * len(conversations)
    prompts = [render_prompt(tokenizer, template, messages, functions) for messages, functions in zip(conversations, declared)]
    device = next(model.parameters()).device
    answers: list[str] = []
    padding_side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False,
                truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens,
            ).to(device)
            with torch.no_grad():
                output = model.generate(
                    **encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                    **sampling,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(new_tokens))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = padding_side, truncation_side
    return answers
