"""Held-out exact match during training: answer the last user turn, compare final answers."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config import EvalConfig
from tunelab.eval.generate import generate_answers
from tunelab.eval.metrics import exact_match


class ExactMatchEvaluator:
    """Greedy answers to the first ``generate_samples`` held-out conversations, scored by exact match."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: str, records: list[dict]
    ) -> dict[str, float]:
        """``{"eval_exact_match": fraction}`` over the conversations that end with an assistant turn."""
        prompts, references = [], []
        for record in records:
            messages = record["messages"]
            if messages and messages[-1]["role"] == "assistant":
                prompts.append(messages[:-1])
                references.append(messages[-1]["content"])
            if len(prompts) == self.cfg.generate_samples:
                break
        if not prompts:
            return {}
        answers = generate_answers(model, tokenizer, template, prompts, self.cfg.max_new_tokens, self.cfg.batch_size)
        return {"eval_exact_match": exact_match(answers, references, self.cfg.answer_pattern)}
