"""Reward-model scoring: the score head read where reward training reads it, and a scorer for files and rollouts.

:func:`sequence_rewards` is the one place a reward is read from a sequence classifier (reward
training's loss, online RL's reward model and ``tunelab eval --reward-model`` all use it), at the
token :func:`scored_positions` picks: the last one that is not the pad id, as transformers' own
pooling does. :class:`RewardModelScorer` loads a trained reward model (or its adapter) and scores
(prompt messages, completion) pairs rendered as reward training renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tunelab.data.packing import Batch, collate_padded, sequence_index
from tunelab.data.templates import render_conversation, resolve_template
from tunelab.errors import ConfigError


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


def end_of_turn_ids(tokenizer: Any, template: str) -> set[int]:
    """The special token a chat template writes right after an assistant message (e.g. ``<|im_end|>``), if any."""
    marker = "MARKER"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this simply has no detectable end token
        return set()
    end = text.rfind(marker) + len(marker)
    if end < len(marker):
        return set()
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token, (start, _) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        if start >= end:
            return {token} if token in special else set()
    return set()


class RewardModelScorer:
    """Scores (prompt messages, completion) pairs with a trained reward model.

    ``path`` is a sequence-classification model directory with one label (as ``train.objective:
    reward`` saves it with full fine-tuning) or a PEFT adapter with ``task_type: SEQ_CLS`` whose
    ``base_model_name_or_path`` is the base. Conversations are rendered with the chat template
    saved with the reward model and tokenized as reward training does (the completion is the
    last assistant turn and ends with a stop token); the score is read where reward training and
    transformers' own pooling read it (:func:`sequence_rewards`:
    the last token that is not the pad id). Only safetensors weights load; remote code never runs.

    Args:
        path: the reward model (or adapter) directory.
        device: where to run it.
        dtype: the weights' dtype (float32 by default: scores compare across batches).
        batch_size: sequences per forward.
        max_length: longer sequences keep their first ``max_length`` tokens (as reward
            training truncates); None keeps everything.
        template: a chat template to use instead of the saved one.
        stop_ids: the ids that end an assistant turn, as reward training used them (pass the
            policy's); by default the saved generation config's EOS ids, the tokenizer's EOS and
            the special token the chat template puts after an assistant message (a sequence
            classifier's directory usually has no generation config).

    Raises:
        ConfigError: no such directory, not a one-label sequence classifier, an adapter of
            another task or without safetensors weights, a base that is not a local directory.
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        max_length: int | None = None,
        template: str | None = None,
        stop_ids: set[int] | None = None,
    ) -> None:
        from tunelab.models.load import is_adapter_dir, load_tokenizer, stop_token_ids

        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        if not self.path.is_dir():
            raise ConfigError(f"reward_model {path}: no such directory")
        if is_adapter_dir(self.path):
            self.model, base_path = self._load_adapter(dtype)
        else:
            self.model, base_path = self._load_full(dtype), self.path
        has_tokenizer = (self.path / "tokenizer_config.json").is_file() or (self.path / "tokenizer.json").is_file()
        self.tokenizer = load_tokenizer(str(self.path if has_tokenizer else base_path))
        self.template = template or resolve_template(self.tokenizer, "auto", fallback="chatml")
        if stop_ids is None:
            stop_ids = stop_token_ids(str(base_path), self.tokenizer) | end_of_turn_ids(self.tokenizer, self.template)
        self.stop_ids = set(stop_ids)
        config = self._classifier().config
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def _load_full(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        try:
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"reward_model {self.path}: not a Hugging Face model directory: {exc}") from None
        architectures = config.architectures or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures) or config.num_labels != 1:
            raise ConfigError(
                f"reward_model {self.path}: not a reward model (architectures {architectures}, "
                f"{config.num_labels} labels); train one with train.objective: reward"
            )
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"reward_model {self.path}: cannot load it (safetensors only): {exc}") from None

    def _load_adapter(self, dtype: torch.dtype) -> tuple[torch.nn.Module, Path]:
        from peft import PeftConfig, PeftModel
        from transformers import AutoModelForSequenceClassification

        adapter = PeftConfig.from_pretrained(str(self.path))
        if str(adapter.task_type) not in ("SEQ_CLS", "TaskType.SEQ_CLS"):
            raise ConfigError(
                f"reward_model {self.path}: the adapter's task_type is {adapter.task_type}, not SEQ_CLS; "
                "it is not a reward model adapter"
            )
        if not (self.path / "adapter_model.safetensors").is_file():
            raise ConfigError(f"reward_model {self.path}: no adapter_model.safetensors; "
                              "tunelab never loads pickled weights")
        base = Path(str(adapter.base_model_name_or_path)).expanduser()
        if not base.is_dir():
            raise ConfigError(f"reward_model {self.path}: its base model {adapter.base_model_name_or_path} "
                              "is not a local directory")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"reward_model {self.path}: cannot load its base {base}: {exc}") from None
        return PeftModel.from_pretrained(model, str(self.path)), base

    def _classifier(self) -> torch.nn.Module:
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def tokenize(self, prompt: list[dict], completion: str) -> list[int]:
        """The token ids of a prompt answered by ``completion``, as reward training renders them."""
        earlier_turns = sum(1 for message in prompt if message["role"] == "assistant")
        messages = [*prompt, {"role": "assistant", "content": completion}]
        ids = render_conversation(self.tokenizer, self.template, messages, "assistant", self.stop_ids,
                                  earlier_turns).input_ids
        return ids[: self.max_length] if self.max_length is not None else ids

    @torch.no_grad()
    def score(self, prompts: Sequence[list[dict]], completions: Sequence[str]) -> list[float]:
        """The reward of each completion to its prompt (chat messages ending with the user turn)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        sequences = [self.tokenize(list(p), c) for p, c in zip(prompts, completions)]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding per batch
        scores = [0.0] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = collate_padded([{"input_ids": sequences[i], "labels": sequences[i]} for i in chunk],
                                   self.tokenizer.pad_token_id)
            values = sequence_rewards(self.model, batch.to(self.device)).tolist()
            for i, value in zip(chunk, values):
                scores[i] = value
        return scores

    def __call__(self, prompts: Sequence[list[dict]], completions: Sequence[str]) -> list[float]:
        """Same as :meth:`score`."""
        return self.score(prompts, completions)
