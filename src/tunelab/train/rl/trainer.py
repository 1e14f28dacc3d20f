"""Online RL: GRPO and PPO, trained on the policy's own rollouts.

Reads top to bottom like the engine it shares its pieces with: set up (output dir, tokenizer,
prompts, reward, model, reference, optimizer, resume), then for each RL step a rollout phase
(sample answers to ``prompts_per_step`` prompts, score them) and an update phase
(``update_epochs`` passes of ``minibatches`` optimizer steps each), then save.

Everything a step does is a function of (seed, step): which prompts it takes and the sampling
seed, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config import TunelabConfig, TrainConfig
from tunelab.data.files import file_fingerprint
from tunelab.data.kinds import check_data_kind
from tunelab.data.records import Prompt, load_prompts
from tunelab.data.templates import render_prompt, resolve_template
from tunelab.data.tokenize import split_records
from tunelab.errors import TrainingError, TunelabError
from tunelab.models.adapters import apply_method, count_parameters, enable_gradient_checkpointing
from tunelab.models.load import (
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_load_dtype,
    resolve_precision,
    stop_token_ids,
)
from tunelab.outputs import write_errors
from tunelab.train.checkpoint import load_checkpoint, save_checkpoint
from tunelab.train.engine import (
    Evaluator,
    TrainResult,
    autocast_factory,
    due_before_end,
    ensure_tiny_model,
    kept_checkpoint,
    save_final,
    seed_everything,
)
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.reference import frozen_copy
from tunelab.train.reporting import Reporter, console
from tunelab.train.run_dir import RunDirectory
from tunelab.train.rl.grpo import group_advantages, grpo_loss
from tunelab.train.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    ValueHead,
    entropy_bonus,
    gae,
    kl_estimate,
    masked_mean,
    policy_loss,
    token_rewards,
    token_values,
    value_loss,
    whiten,
)
from tunelab.train.rl.rewards import RewardModelScorer, combine_rewards, load_reward_fn
from tunelab.train.rl.rollout import RolloutBatch, Rollouts, collate_rollouts, forward_tokens, generate_rollouts
from tunelab.train.run_info import write_run_json

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PromptSet:
    """Prompts ready for rollouts: the records and their rendered token ids."""

    records: list[Prompt]
    ids: list[list[int]]


class Reward:
    """The run's reward: weighted reward functions plus an optional reward model.

    Returns the total per completion and each part (logged as ``reward/<name>``).
    """

    def __init__(self, train: TrainConfig, device: torch.device) -> None:
        weights = train.reward_weights or [1.0] * len(train.reward_fn)
        # Logged as reward/<name>: the function's name for module:function specs.
        parts = {spec.rsplit(":", 1)[-1]: (load_reward_fn(spec), w) for spec, w in zip(train.reward_fn, weights)}
        self.functions = combine_rewards(parts) if parts else None
        self.model = RewardModelScorer(train.reward_model, device) if train.reward_model else None

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
        tokens = tokenizer(render_prompt(tokenizer, template, record.messages, record.tools), add_special_tokens=False)["input_ids"]
        if len(tokens) > max_prompt:
            too_long += 1
            continue
        kept.append(record)
        ids.append(tokens)
    if too_long:
        console.print(f"[yellow]{what}: {too_long} prompts longer than data.max_length - train.max_new_tokens "
                      f"({max_prompt} tokens) dropped")
    if not kept:
        raise TunelabError(f"{what}: no prompt fits in {max_prompt} tokens; raise data.max_length")
    return PromptSet(kept, ids)


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


def reference_tokens(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: RolloutBatch,
                     temperature: float) -> torch.Tensor:
    """Per-token log-probs under the reference: the frozen copy, or the policy with adapters off."""
    with torch.no_grad():
        if reference is not None:
            return forward_tokens(reference, batch, temperature).logprobs
        with policy.disable_adapter():
            return forward_tokens(policy, batch, temperature).logprobs


def minibatch_rows(size: int, minibatches: int, seed: int, step: int, epoch: int) -> list[list[int]]:
    """Split rollout rows into ``minibatches`` shuffled groups (seeded by step and epoch)."""
    order = np.random.default_rng([seed, step, epoch, 7]).permutation(size).tolist()
    return [sorted(order[k::minibatches]) for k in range(minibatches) if order[k::minibatches]]


def chunks(rows: list[int], size: int) -> list[list[int]]:
    """``rows`` in pieces of at most ``size`` (micro-batches of one optimizer step)."""
    return [rows[k : k + size] for k in range(0, len(rows), size)]


def select(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """Some rows of a rollout batch, trimmed to their longest sequence."""
    index = torch.tensor(rows, device=batch.input_ids.device)
    width = int(batch.attention_mask[index].sum(dim=1).max())
    take = lambda t: t[index, :width]  # noqa: E731
    return RolloutBatch(take(batch.input_ids), take(batch.attention_mask), take(batch.position_ids),
                        take(batch.completion_mask))


class OnlineRL:
    """One RL step at a time: rollouts, rewards, advantages and the policy (and critic) updates."""

    def __init__(self, cfg: TunelabConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 reference: torch.nn.Module | None, value_head: ValueHead | None, reward: Reward,
                 stop_ids: set[int], optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                 autocast: Callable[[], Any]) -> None:
        self.cfg, self.train_cfg = cfg, cfg.train
        self.model, self.tokenizer, self.reference, self.value_head = model, tokenizer, reference, value_head
        self.reward, self.stop_ids = reward, stop_ids
        self.optimizer, self.scheduler, self.device, self.autocast = optimizer, scheduler, device, autocast
        t = cfg.train
        self.kl_controller = (AdaptiveKLController(t.kl_coef, t.kl_target, horizon=10_000) if t.kl_target
                              else FixedKLController(t.kl_coef))
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if value_head is not None:
            self.trainable += list(value_head.parameters())

    def rollout(self, prompts: PromptSet, indices: list[int], samples: int, temperature: float, seed: int
                ) -> tuple[Rollouts, list[str], list[float], dict[str, list[float]]]:
        """Sample answers to the chosen prompts and score them."""
        t = self.train_cfg
        rollouts = generate_rollouts(
            self.model, self.tokenizer, [prompts.ids[i] for i in indices], samples, t.max_new_tokens, temperature,
            t.top_p, self.stop_ids, seed, t.generation_batch_size,
        )
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        records = [prompts.records[indices[i]] for i in rollouts.prompt_index]
        decoded = self.tokenizer.batch_decode([prompts.ids[i] for i in indices])  # once per prompt, not per sample
        prompt_texts = [decoded[i] for i in rollouts.prompt_index]
        rewards, parts = self.reward(records, prompt_texts, texts)
        return rollouts, texts, rewards, parts

    def _optimizer_step(self) -> float:
        max_norm = self.train_cfg.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(grad_norm):
            raise TrainingError(f"gradient norm became {grad_norm}; stopped without updating the weights")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def update(self, rollouts: Rollouts, rewards: list[float], step: int) -> dict[str, float]:
        """The update phase of one RL step; returns its metrics."""
        t = self.train_cfg
        batch = collate_rollouts(rollouts, self.tokenizer.pad_token_id).to(self.device)
        mask = batch.completion_mask
        scores = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        temperature = t.temperature or 1.0
        multiple_updates = t.update_epochs * t.minibatches > 1
        start = None  # the policy before this update: needed for several updates and for the critic
        with torch.no_grad(), self.autocast():
            if multiple_updates or self.value_head is not None:
                start = forward_tokens(self.model, batch, temperature, hidden=self.value_head is not None)
            ref = reference_tokens(self.model, self.reference, batch, temperature) if self.kl_controller.value else None
        metrics: dict[str, list[float]] = {}
        if self.value_head is None:  # GRPO
            advantages = group_advantages(scores, rollouts.num_samples)
            old_values = returns = None
        else:  # PPO: per-token KL penalty, the score on the last token, GAE over the critic's values
            kl = kl_estimate(start.logprobs, ref, "k1") if ref is not None else torch.zeros_like(start.logprobs)
            with torch.no_grad():
                old_values = token_values(self.value_head, start.hidden, mask)
            rewards_per_token = token_rewards(scores, kl, self.kl_controller.value, mask)
            advantages, returns = gae(rewards_per_token, old_values, mask, t.discount, t.gae_lambda)
            if t.whiten_advantages:
                advantages = whiten(advantages, mask)
            sequence_kl = float(((kl * mask).sum(dim=1)).mean())
            metrics["kl"] = [sequence_kl]
            self.kl_controller.update(sequence_kl, len(rollouts))
        grad_norms, losses = [], []
        for epoch in range(t.update_epochs):
            for rows in minibatch_rows(len(rollouts), t.minibatches, t.seed, step, epoch):
                tokens = float(mask[rows].sum())
                losses.append(0.0)
                for piece in chunks(rows, t.generation_batch_size):
                    part = self._piece_loss(batch, piece, start.logprobs if start else None, ref, advantages,
                                            old_values, returns,
                                            temperature, tokens, multiple_updates, metrics)
                    part.backward()
                    losses[-1] += float(part.detach())
                grad_norms.append(self._optimizer_step())
        summary = {"loss": float(np.mean(losses))}
        summary.update({name: float(np.mean(values)) for name, values in metrics.items()})
        summary["grad_norm"] = float(np.mean(grad_norms))
        return summary

    def _piece_loss(self, batch: RolloutBatch, rows: list[int], start_logp: torch.Tensor | None,
                    ref: torch.Tensor | None,
                    advantages: torch.Tensor, old_values: torch.Tensor | None, returns: torch.Tensor | None,
                    temperature: float, tokens: float, multiple_updates: bool,
                    metrics: dict[str, list[float]]) -> torch.Tensor:
        """The loss of some rows, as their share of the minibatch's token mean; metrics appended."""
        t = self.train_cfg
        sub = select(batch, rows)
        width = sub.input_ids.shape[1]
        index = torch.tensor(rows, device=self.device)
        cut = lambda x: None if x is None else x[index, :width]  # noqa: E731
        mask = sub.completion_mask
        with self.autocast():
            stats = forward_tokens(self.model, sub, temperature, entropy=True, hidden=self.value_head is not None)
        old_logp = cut(start_logp) if multiple_updates else stats.logprobs.detach()
        entropy = entropy_bonus(stats.entropy, mask, t.entropy_coef, tokens)
        if self.value_head is None:
            loss, parts = grpo_loss(stats.logprobs, old_logp, cut(ref), advantages[index], mask, t.clip_range,
                                    t.clip_range_high or t.clip_range, self.kl_controller.value, "dapo", tokens)
            for name, value in parts.items():
                metrics.setdefault(name, []).append(float(value))
        else:
            loss, clip_fraction, approx_kl = policy_loss(stats.logprobs, old_logp, cut(advantages), mask,
                                                         t.clip_range, tokens)
            values = token_values(self.value_head, stats.hidden, mask)
            critic, value_clip = value_loss(values, cut(old_values), cut(returns), mask, t.value_clip_range, tokens)
            loss = loss + t.value_coef * critic
            metrics.setdefault("clip_fraction", []).append(float(clip_fraction))
            metrics.setdefault("approx_kl", []).append(float(approx_kl))
            metrics.setdefault("value_loss", []).append(float(critic.detach()) * tokens / max(float(mask.sum()), 1.0))
            metrics.setdefault("value_clip_fraction", []).append(float(value_clip))
        metrics.setdefault("entropy", []).append(float(masked_mean(stats.entropy.detach(), mask)))
        return loss + entropy

    def evaluate(self, prompts: PromptSet, limit: int) -> dict[str, float]:
        """Greedy answers to held-out prompts: mean reward and its parts."""
        indices = list(range(min(limit, len(prompts.ids))))
        rollouts, _, rewards, parts = self.rollout(prompts, indices, 1, 0.0, self.train_cfg.seed)
        row = {"eval_reward": float(np.mean(rewards)),
               "eval_completion_length": float(np.mean(rollouts.completion_lengths()))}
        row.update({f"eval_reward/{name}": float(np.mean(values)) for name, values in parts.items()})
        return row


def _load_prompt_sets(cfg: TunelabConfig, tokenizer: PreTrainedTokenizerBase, template: str
                      ) -> tuple[PromptSet, PromptSet | None]:
    data = cfg.data
    check_data_kind([*data.train, *(data.eval or [])], cfg.train.objective)
    records, report = load_prompts(data.train, data.format, data.on_error, data.system_prompt, data.max_samples)
    for line in report.summary().splitlines():
        console.print(f"[dim]train prompts:[/dim] {line}", highlight=False)
    if data.eval:
        held_out, _ = load_prompts(data.eval, data.format, data.on_error, data.system_prompt)
    else:
        records, held_out = split_records(records, data.val_ratio, cfg.train.seed)
    max_prompt = data.max_length - cfg.train.max_new_tokens
    if max_prompt < 1:
        raise TunelabError(f"data.max_length ({data.max_length}) must exceed train.max_new_tokens "
                           f"({cfg.train.max_new_tokens}): it bounds prompt + answer")
    train_set = prepare_prompts(records, tokenizer, template, max_prompt, "train prompts")
    eval_set = prepare_prompts(held_out, tokenizer, template, max_prompt, "eval prompts") if held_out else None
    console.print(f"[dim]prompts: {len(train_set.ids)} train, {len(eval_set.ids) if eval_set else 0} held out[/dim]")
    return train_set, eval_set


def train_online(config: TunelabConfig, resume: bool = False, overwrite: bool = False,
                 evaluators: Sequence[Evaluator] = ()) -> TrainResult:
    """Run GRPO or PPO from a validated config (see :func:`tunelab.train.engine.train`).

    ``evaluators`` are called at each evaluation with the held-out prompts as records.

    Raises:
        TunelabError: bad config, data, reward or model; TrainingError when training diverges.
    """
    run_dir = RunDirectory(config, resume, overwrite)
    run_dir.open()  # locked, checked and cleaned before anything slow
    try:
        return _train_online(config, run_dir, evaluators)
    finally:
        run_dir.close()


def _train_online(config: TunelabConfig, run_dir: RunDirectory, evaluators: Sequence[Evaluator]) -> TrainResult:
    cfg, t, started = config, config.train, time.perf_counter()
    out = run_dir.path
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    autocast = autocast_factory(device, precision)
    ensure_tiny_model(cfg)
    seed_everything(t.seed)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)
    stop_ids = stop_token_ids(cfg.model.path, tokenizer, cfg.model.trust_remote_code)
    template = resolve_template(tokenizer, cfg.data.template)
    tokenizer.chat_template = template
    prompts, held_out = _load_prompt_sets(cfg, tokenizer, template)
    reward = Reward(t, device)

    model_path = str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path
    load_dtype = resolve_load_dtype(cfg.model, cfg.method.type, device)
    model = load_model(cfg.model.model_copy(update={"path": model_path}), load_dtype, device, "sdpa")
    reference = None
    if t.kl_coef > 0 or t.kl_target:
        if cfg.method.uses_lora:
            console.print("[dim]reference model: the base with LoRA adapters switched off (no second copy)[/dim]")
        else:
            reference = frozen_copy(model)
            console.print("[dim]reference model: a frozen copy of the starting weights[/dim]")
    model = apply_method(model, cfg.method)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.train.checkpoint_layers)
    value_head = ValueHead(model.config.hidden_size).to(device) if t.objective == "ppo" else None
    params = count_parameters(model)
    console.print(f"model: {type(model).__name__} on {device}, weights {load_dtype}, autocast {precision}; {params}")

    total_steps = t.max_steps or math.ceil(t.epochs * len(prompts.ids) / t.prompts_per_step)
    optimizer = build_optimizer(model, t, cfg.method.lora_plus_ratio if cfg.method.uses_lora else None)
    if value_head is not None:
        optimizer.add_param_group({"params": list(value_head.parameters()), "weight_decay": 0.0})
    scheduler = build_scheduler(optimizer, t, total_steps * t.update_epochs * t.minibatches)
    rl = OnlineRL(cfg, model, tokenizer, reference, value_head, reward, stop_ids, optimizer, scheduler, device,
                  autocast)

    state: dict[str, Any] = {"elapsed": 0.0, "tokens": 0, "last_eval": {}}
    start_step = 0
    checkpoint = run_dir.checkpoint()
    if checkpoint is not None:
        state = {**state, **load_checkpoint(checkpoint, model, optimizer, scheduler, None)}
        start_step = state["step"]
        rl.kl_controller.load_state_dict(state["kl_controller"])
        if value_head is not None:
            value_head.load_state_dict(ValueHead.load(checkpoint, device).state_dict())
        console.print(f"resumed from {checkpoint} (step {start_step})")
    elif run_dir.resume:
        console.print("--resume: no checkpoint to resume from, starting from the beginning")

    run_dir.write_config()
    reporter = Reporter(out, total_steps, start_step, t.tensorboard)
    eval_limit = cfg.eval.generate_samples or 64

    def run_evaluation(step: int) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        if held_out is not None:
            row.update(rl.evaluate(held_out, eval_limit))
            records = [{"messages": p.messages, "reference": p.reference} for p in held_out.records[:eval_limit]]
            for evaluator in evaluators:
                row.update(evaluator(model, tokenizer, template, records))
        if len(row) > 1:
            reporter.log(row)
        return row

    def checkpoint_now(step: int) -> None:
        trainer_state = {**state, "elapsed": state["elapsed"] + time.perf_counter() - window_start,
                         "kl_controller": rl.kl_controller.state_dict(), "last_eval": last_eval}
        extra = {VALUE_HEAD_FILE: value_head.state_dict()} if value_head is not None else None
        with write_errors(out / "checkpoints" / f"step-{step}", f"checkpoint of step {step}",
                          kept=lambda: kept_checkpoint(out)):
            save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, None, trainer_state,
                            t.keep_checkpoints, extra)

    window_start = time.perf_counter()
    last_eval: dict[str, Any] = state["last_eval"]
    try:
        start_eval = run_evaluation(0) if t.eval_at_start and start_step == 0 else {}
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            indices = prompts_for_step(step, len(prompts.ids), t.prompts_per_step, t.seed)
            reporter.phase(f"step {step + 1}: rollout ({len(indices) * t.num_generations} answers)")
            rollouts, _, rewards, parts = rl.rollout(prompts, indices, t.num_generations, t.temperature,
                                                     t.seed * 100_003 + step)
            reporter.phase(f"step {step + 1}: update ({t.update_epochs * t.minibatches} optimizer steps)")
            model.train()
            metrics = rl.update(rollouts, rewards, step)
            lengths = rollouts.completion_lengths()
            state["tokens"] += sum(len(p) for p in rollouts.prompt_ids) + sum(lengths)
            done = step + 1
            reporter.advance(done)
            if done % t.log_every == 0 or done == total_steps:
                reporter.log({
                    "step": done,
                    "reward": float(np.mean(rewards)),
                    "reward_std": float(np.std(rewards)),
                    **{f"reward/{name}": float(np.mean(values)) for name, values in parts.items()},
                    **metrics,
                    "completion_length": float(np.mean(lengths)),
                    "finished": float(np.mean(rollouts.finished)),
                    "kl_coef": rl.kl_controller.value,
                    "lr": scheduler.get_last_lr()[0],
                    "step_s": round(time.perf_counter() - step_start, 3),
                    "elapsed_s": round(state["elapsed"] + time.perf_counter() - window_start, 2),
                })
            if due_before_end(t.eval_every, done, total_steps):
                last_eval = run_evaluation(done)
            if due_before_end(t.save_every, done, total_steps):
                checkpoint_now(done)
        if total_steps > start_step or not last_eval:
            last_eval = run_evaluation(total_steps)
        if total_steps > start_step:  # resumed from the last step's checkpoint: it is already there
            checkpoint_now(total_steps)
    finally:
        reporter.close()

    final_dir = out / "final"
    with write_errors(final_dir, "final model", kept=f"checkpoints/step-{total_steps} holds the trained weights; "
                      "free space and run again with --resume to write final/"):
        save_final(model, tokenizer, stop_ids, final_dir, extra=value_head.save if value_head is not None else None)
    elapsed = state["elapsed"] + time.perf_counter() - window_start
    fingerprint = hashlib.sha256("".join(file_fingerprint(f) for f in cfg.data.train).encode()).hexdigest()[:20]
    with write_errors(out / "run.json", "run record", kept=f"{final_dir} and the checkpoints are complete"):
        write_run_json(out, cfg, fingerprint, device, precision, params, total_steps, elapsed,
                       time.perf_counter() - started, last_eval)
    console.print(f"saved {final_dir}")
    return TrainResult(out, final_dir, total_steps, last_eval, start_eval, model, tokenizer)
