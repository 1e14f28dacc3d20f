"""The online source of the engine's steps: prompts -> rollouts -> rewards -> the objective's windows.

Each RL step takes ``prompts_per_step`` prompts (consecutive slices of seeded per-epoch
shuffles), samples ``num_generations`` answers to each through the run's rollout generator
(:mod:`tunelab.train.rl.generators`), scores them with the run's reward (reward functions and/or
a reward model) and hands them to the online objective, which returns the step's optimizer
windows. Everything a step does is a function of (seed, step), so a resumed run repeats the
uninterrupted one exactly; with several processes every process samples the same rollouts (the
same seed and weights) and the engine splits the update among them, so the losses are those of
one process with the same batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config import TunelabConfig
from tunelab.data.files import file_fingerprint
from tunelab.data.records import Prompt
from tunelab.data.readers import load_prompts
from tunelab.data.templates import render_prompt
from tunelab.data.tokenize import split_records
from tunelab.errors import TunelabError
from tunelab.train.reporting import console
from tunelab.train.rl.generators import RolloutGenerator
from tunelab.models.reward_scoring import RewardModelScorer
from tunelab.train.rl.online import OnlineObjective, OnlineSettings
from tunelab.train.rl.rewards import combine_rewards, load_reward_fn
from tunelab.train.rl.rollout import Rollouts
from tunelab.train.steps import StepWork


@dataclass
class PromptSet:
    """Prompts ready for rollouts: the records and their rendered token ids."""

    records: list[Prompt]
    ids: list[list[int]]


class Reward:
    """The run's reward: weighted reward functions plus an optional reward model.

    Returns the total per completion and each part (logged as ``reward/<name>``).
    """

    def __init__(self, settings: OnlineSettings, device: torch.device) -> None:
        weights = settings.reward_weights or [1.0] * len(settings.reward_fn)
        # Logged as reward/<name>: the function's name for module:function specs.
        parts = {spec.rsplit(":", 1)[-1]: (load_reward_fn(spec), w) for spec, w in zip(settings.reward_fn, weights)}
        self.functions = combine_rewards(parts) if parts else None
        self.model = RewardModelScorer(settings.reward_model, device) if settings.reward_model else None

    def __call__(self, prompts: Sequence[Prompt], prompt_texts: list[str], completions: list[str]
                 ) -> tuple[list[float], dict[str, list[float]]]:
        """Total reward of each completion, and the parts."""
        parts: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        if self.functions is not None:
            parts = self.functions.components(prompt_texts, completions, [p.reference for p in prompts])
            total = self.functions.combine(parts)
        if self.model is not None:
            scores = self.model.score([p.messages for p in prompts], completions)
            parts["reward_model"] = scores
            total = [t + s for t, s in zip(total, scores)]
        return total, parts


def prepare_prompts(records: list[Prompt], tokenizer: PreTrainedTokenizerBase, template: str, max_prompt: int,
                    what: str) -> PromptSet:
    """Render and tokenize prompts; drop (and count) those longer than ``max_prompt`` tokens."""
    kept, ids, too_long = [], [], 0
    for record in records:
        tokens = tokenizer(render_prompt(tokenizer, template, record.messages, record.tools),
                           add_special_tokens=False)["input_ids"]
        if len(tokens) > max_prompt:
            too_long += 1
            continue
        kept.append(record)
        ids.append(tokens)
    if too_long:
        console.print(f"[yellow]{what}: {too_long} prompts longer than data.max_length - max_new_tokens "
                      f"({max_prompt} tokens) dropped")
    if not kept:
        raise TunelabError(f"{what}: no prompt fits in {max_prompt} tokens; raise data.max_length")
    return PromptSet(kept, ids)


def load_prompt_sets(cfg: TunelabConfig, tokenizer: PreTrainedTokenizerBase, template: str
                     ) -> tuple[PromptSet, PromptSet | None]:
    """The training prompts and the held-out ones (``data.eval``, or ``data.val_ratio`` of train)."""
    data = cfg.data
    records, report = load_prompts(data.train, data.format, data.on_error, data.system_prompt, data.max_samples)
    for line in report.summary().splitlines():
        console.print(f"[dim]train prompts:[/dim] {line}", highlight=False)
    if data.eval:
        held_out, _ = load_prompts(data.eval, data.format, data.on_error, data.system_prompt)
    else:
        records, held_out = split_records(records, data.val_ratio, cfg.train.seed)
    max_new_tokens, name = cfg.objective_settings.max_new_tokens, cfg.train.objective
    max_prompt = data.max_length - max_new_tokens
    if max_prompt < 1:
        raise TunelabError(f"data.max_length ({data.max_length}) must exceed {name}.max_new_tokens "
                           f"({max_new_tokens}): it bounds prompt + answer")
    train_set = prepare_prompts(records, tokenizer, template, max_prompt, "train prompts")
    eval_set = prepare_prompts(held_out, tokenizer, template, max_prompt, "eval prompts") if held_out else None
    console.print(f"[dim]prompts: {len(train_set.ids)} train, {len(eval_set.ids) if eval_set else 0} held out[/dim]")
    return train_set, eval_set


def prompts_for_step(step: int, count: int, per_step: int, seed: int) -> list[int]:
    """The prompt indices of RL step ``step``: consecutive slices of seeded per-epoch shuffles."""
    orders: dict[int, np.ndarray] = {}  # a step spans at most a few epochs: one shuffle each
    chosen = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(count)
        chosen.append(int(orders[epoch][index]))
    return chosen


def prompts_fingerprint(files: Sequence[str]) -> str:
    """The data fingerprint of an online run (its prompt files)."""
    return hashlib.sha256("".join(file_fingerprint(f) for f in files).encode()).hexdigest()[:20]


class RolloutSource:
    """Turns RL step numbers into :class:`StepWork`: sample, score, hand to the objective.

    Args:
        model: the policy (the PEFT model, not a distributed wrapper).
        eval_limit: held-out prompts answered at each evaluation.
        context: where the model may be called directly (the strategy's generation context).
        phase: shows what the step is doing beside the progress bar.
    """

    def __init__(self, cfg: TunelabConfig, objective: OnlineObjective, generator: RolloutGenerator,
                 tokenizer: PreTrainedTokenizerBase, prompts: PromptSet, held_out: PromptSet | None, reward: Reward,
                 model: torch.nn.Module, device: torch.device, autocast: Callable[[], Any], eval_limit: int,
                 context: Callable[[], AbstractContextManager], phase: Callable[[str], None]) -> None:
        self.train, self.settings, self.objective, self.generator = cfg.train, cfg.objective_settings, objective, generator
        self.tokenizer, self.prompts, self.held_out, self.reward = tokenizer, prompts, held_out, reward
        self.model, self.device, self.autocast, self.context, self.phase = model, device, autocast, context, phase
        self.eval_limit = eval_limit

    def total_steps(self) -> int:
        """RL steps of the run: ``max_steps``, or ``epochs`` over the prompts."""
        t = self.train
        return t.max_steps or math.ceil(t.epochs * len(self.prompts.ids) / self.settings.prompts_per_step)

    def progress(self, steps: int) -> float:
        """Epochs over the training prompts after ``steps`` RL steps."""
        return steps * self.settings.prompts_per_step / len(self.prompts.ids)

    def rollout(self, prompts: PromptSet, indices: list[int], samples: int, temperature: float, seed: int
                ) -> tuple[Rollouts, list[float], dict[str, list[float]]]:
        """Sample answers to the chosen prompts and score them."""
        with self.context():
            rollouts = self.generator.generate(self.model, [prompts.ids[i] for i in indices], samples, temperature,
                                               seed)
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        records = [prompts.records[indices[i]] for i in rollouts.prompt_index]
        decoded = self.tokenizer.batch_decode([prompts.ids[i] for i in indices])  # once per prompt, not per sample
        prompt_texts = [decoded[i] for i in rollouts.prompt_index]
        rewards, parts = self.reward(records, prompt_texts, texts)
        return rollouts, rewards, parts

    def step(self, step: int) -> StepWork:
        """RL step ``step``: rollouts, rewards, and the objective's windows (model in training mode)."""
        t, settings = self.train, self.settings
        started = time.perf_counter()
        indices = prompts_for_step(step, len(self.prompts.ids), settings.prompts_per_step, t.seed)
        samples = self.objective.samples_per_prompt
        self.phase(f"step {step + 1}: rollout ({len(indices) * samples} answers)")
        rollouts, rewards, parts = self.rollout(self.prompts, indices, samples, settings.temperature,
                                                t.seed * 100_003 + step)
        self.phase(f"step {step + 1}: update ({self.objective.optimizer_steps_per_step} optimizer steps)")
        self.model.train()
        with self.context():
            windows, objective_metrics = self.objective.prepare(self.model, rollouts, rewards, step,
                                                                self.tokenizer.pad_token_id, self.device,
                                                                self.autocast, t.seed)
        lengths = rollouts.completion_lengths()
        metrics = {
            "reward": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            **{f"reward/{name}": float(np.mean(values)) for name, values in parts.items()},
            "completion_length": float(np.mean(lengths)),
            "finished": float(np.mean(rollouts.finished)),
            **objective_metrics,
            "rollout_s": round(time.perf_counter() - started, 3),
        }
        tokens = sum(len(p) for p in rollouts.prompt_ids) + sum(lengths)
        return StepWork(windows, tokens, 1.0, metrics)

    def updated(self) -> None:
        """The step's updates are done: the generator samples from the new weights next."""
        self.generator.weights_changed()

    def evaluate(self, parallel: Any, autocast: Callable[[], Any]) -> dict[str, float]:
        """Greedy answers to (at most ``eval_limit``) held-out prompts: mean reward and its parts."""
        if self.held_out is None:
            return {}
        indices = list(range(min(self.eval_limit, len(self.held_out.ids))))
        rollouts, rewards, parts = self.rollout(self.held_out, indices, 1, 0.0, self.train.seed)
        row = {"eval_reward": float(np.mean(rewards)),
               "eval_completion_length": float(np.mean(rollouts.completion_lengths()))}
        row.update({f"eval_reward/{name}": float(np.mean(values)) for name, values in parts.items()})
        return row

    def state_dict(self) -> dict[str, Any]:
        """Nothing: a step is a function of (seed, step)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def held_out_records(self) -> list[dict[str, Any]]:
        """The held-out prompts (at most ``eval_limit``) as records for generation evaluators."""
        if self.held_out is None:
            return []
        return [{"messages": p.messages, "reference": p.reference} for p in self.held_out.records[:self.eval_limit]]
