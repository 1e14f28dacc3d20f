"""Generation metrics during training: answer held-out prompts every evaluation and score them."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config import EvalConfig
from tunelab.eval.generate import generate_answers
from tunelab.eval.metrics import corpus_metrics


class GenerationEvaluator:
    """Greedy answers to the first ``eval.generate_samples`` held-out conversations.

    Each conversation's final assistant turn is the reference; ``eval.metrics`` (default
    exact_match) are logged as ``eval_<metric>`` rows in metrics.jsonl.
    """

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: str, records: list[dict]
    ) -> dict[str, float]:
        """``{"eval_<metric>": value}`` over conversations that end with an assistant turn."""
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
        scores = corpus_metrics(answers, references, self.cfg.metrics, self.cfg.answer_pattern)
        return {f"eval_{name}": scores[name] for name in self.cfg.metrics if scores[name] is not None}


def training_evaluators(cfg: EvalConfig) -> list[GenerationEvaluator]:
    """The evaluators ``tunelab train`` runs at each evaluation: held-out generation when ``eval.generate_samples``."""
    return [GenerationEvaluator(cfg)] if cfg.generate_samples else []
