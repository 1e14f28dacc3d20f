"""Batched generation with the chat template saved with the model."""

from __future__ import annotations

from collections.abc import Sequence

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
) -> list[str]:
    """Greedy answers to conversations (each ending with the user turn to answer).

    Prompts are left-padded and batched; generation stops at any of the model's EOS ids.
    """
    model.eval()
    prompts = [render_prompt(tokenizer, template, messages) for messages in conversations]
    device = next(model.parameters()).device
    answers: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with torch.no_grad():
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return answers
