"""The training loop: one engine for every objective, in plain PyTorch.

Reads top to bottom: set up (output dir, seed, device, tokenizer, data, model, method, optimizer,
resume), train (accumulate, clip, step, log, evaluate, checkpoint), save (final model, run.json).
The loss of a step is the summed token loss of its micro-batches divided by the trained tokens
of the whole accumulation window, so accumulation equals one big batch exactly.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import TunelabConfig, dump_config
from tunelab.data.packing import Batch, collate_packed, collate_padded, plan_packed, plan_padded
from tunelab.data.tokenize import prepare_data
from tunelab.errors import TrainingError, TunelabError
from tunelab.models.adapters import apply_method, count_parameters, enable_gradient_checkpointing
from tunelab.models.load import (
    add_stop_ids,
    attention_for,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_load_dtype,
    resolve_precision,
    stop_token_ids,
)
from tunelab.models.tiny import create_tiny_model
from tunelab.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model_dir
from tunelab.train.objectives.sft import causal_lm_loss
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.reporting import Reporter, console
from tunelab.train.run_info import write_run_json

# An evaluator scores the model on held-out conversations (e.g. generation exact match).
Evaluator = Callable[[torch.nn.Module, PreTrainedTokenizerBase, str, list[dict]], dict[str, float]]


@dataclass
class TrainResult:
    """Where the run wrote its outputs, how it ended, and the trained model in memory."""

    output_dir: Path
    final_dir: Path
    steps: int
    final_metrics: dict[str, Any]
    start_metrics: dict[str, Any]
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    has_run = (out / "checkpoints").exists() or (out / "final").exists()
    if has_run and not resume:
        if not overwrite:
            raise TunelabError(
                f"output_dir {out} already holds a run; pass --resume to continue it or --overwrite to start again"
            )
        for name in ("checkpoints", "final", "tensorboard"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "run.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def packing_supported(model: PreTrainedModel, device: torch.device) -> bool:
    """Check on the real model that a packed row gives the same logits as separate sequences.

    Models whose attention ignores restarting ``position_ids`` would attend across sequences;
    for them the engine falls back to padded batches.
    """
    generator = torch.Generator().manual_seed(0)
    high = min(model.config.vocab_size, 1000)
    first = torch.randint(1, high, (1, 6), generator=generator).to(device)
    second = torch.randint(1, high, (1, 4), generator=generator).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        separate = torch.cat([model(first, use_cache=False).logits, model(second, use_cache=False).logits], dim=1)
        positions = torch.tensor([list(range(6)) + list(range(4))], device=device)
        packed = model(
            torch.cat([first, second], dim=1), position_ids=positions, use_cache=False, packed_seq_lens=[[6, 4]]
        ).logits
    model.train(was_training)
    error = (packed.float() - separate.float()).abs().max() / separate.float().abs().max().clamp_min(1e-6)
    return bool(error < 1e-2)


class MicroBatches:
    """The run's stream of micro-batches: micro-batch ``m`` is fixed by (seed, m) alone."""

    def __init__(self, dataset: datasets.Dataset, packing: bool, batch_tokens: int, batch_size: int,
                 pad_id: int, seed: int) -> None:
        self.dataset = dataset
        self.lengths = [len(ids) for ids in dataset["input_ids"]]
        self.packing, self.batch_tokens, self.batch_size = packing, batch_tokens, batch_size
        self.pad_id, self.seed = pad_id, seed
        self._plans: dict[int, list[list[int]]] = {}
        self._sizes: dict[int, int] = {}  # micro-batches per epoch: packing can give each epoch a different count

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {  # only the current epoch's plan is kept
                epoch: plan_packed(self.lengths, self.batch_tokens, self.seed, epoch)
                if self.packing
                else plan_padded(self.lengths, self.batch_size, self.seed, epoch)
            }
            self._sizes[epoch] = len(self._plans[epoch])
        return self._plans[epoch]

    def _size(self, epoch: int) -> int:
        return self._sizes[epoch] if epoch in self._sizes else len(self._plan(epoch))

    def locate(self, m: int) -> tuple[int, int]:
        """``(epoch, index within the epoch)`` of micro-batch ``m`` of the run."""
        epoch = 0
        while m >= self._size(epoch):
            m -= self._size(epoch)
            epoch += 1
        return epoch, m

    def count(self, epochs: float) -> int:
        """Micro-batches in the first ``epochs`` epochs (a fraction takes part of the last one)."""
        whole = int(epochs)
        return sum(self._size(e) for e in range(whole)) + math.ceil((epochs - whole) * self._size(whole))

    def progress(self, m: int) -> float:
        """Epochs done after ``m`` micro-batches, e.g. 1.5."""
        epoch, index = self.locate(m)
        return epoch + index / self._size(epoch)

    def get(self, m: int) -> Batch:
        """Micro-batch number ``m`` of the run (epochs follow each other)."""
        epoch, index = self.locate(m)
        return collate(self.dataset, self._plan(epoch)[index], self.packing, self.pad_id)


def collate(dataset: datasets.Dataset, indices: Sequence[int], packing: bool, pad_id: int) -> Batch:
    """Build a batch from dataset rows."""
    columns = dataset[list(indices)]
    examples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)


def eval_batches(dataset: datasets.Dataset, packing: bool, batch_tokens: int, batch_size: int, pad_id: int) -> list[Batch]:
    """Held-out batches in file order (evaluation sums over all of them, so order does not matter)."""
    groups: list[list[int]] = []
    used = 0
    for index, ids in enumerate(dataset["input_ids"]):
        full = bool(groups) and (used + len(ids) > batch_tokens if packing else len(groups[-1]) >= batch_size)
        if not groups or full:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += len(ids)
    return [collate(dataset, group, packing, pad_id) for group in groups]


def evaluate_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, autocast) -> dict[str, float]:
    """Token-averaged held-out loss and its perplexity."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for batch in batches:
            with autocast():
                total += causal_lm_loss(model, batch.to(device)).double()
            count += batch.num_trained
    loss = float(total) / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def backward_window(
    model: torch.nn.Module,
    window: Sequence[Batch],
    device: torch.device,
    autocast: Callable[[], Any] = nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step; return the step's loss.

    Each micro-batch's summed token loss is divided by the trained tokens of the whole window,
    so the accumulated gradients equal those of one batch holding all micro-batches.
    """
    window_trained = sum(batch.num_trained for batch in window)
    step_loss = torch.zeros((), device=device)
    for batch in window:
        with autocast():
            loss = causal_lm_loss(model, batch.to(device)) / window_trained
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    return step_loss


def train(
    config: TunelabConfig,
    resume: bool = False,
    overwrite: bool = False,
    evaluators: Sequence[Evaluator] = (),
) -> TrainResult:
    """Run a fine-tune from a validated config.

    Args:
        config: the run configuration.
        resume: continue from the newest checkpoint in ``output_dir`` (a fresh start if none).
        overwrite: delete an earlier run in ``output_dir`` instead of refusing to start.
        evaluators: extra held-out metrics, called at every evaluation.

    Returns:
        The output locations and final metrics.

    Raises:
        TunelabError: bad config, data or model; TrainingError when the loss becomes NaN/inf.
    """
    cfg, started = config, time.perf_counter()
    out = Path(cfg.output_dir)
    _prepare_output_dir(out, resume, overwrite)
    (out / "config.yaml").write_text(dump_config(cfg))
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    tiny = cfg.model.tiny
    if tiny is not None and not Path(cfg.model.path).exists():
        console.print(f"building a tiny model at {cfg.model.path}")
        create_tiny_model(cfg.model.path, hidden=tiny.hidden, layers=tiny.layers, heads=tiny.heads,
                          vocab=tiny.vocab, tokenizer_corpus=tiny.tokenizer_corpus, seed=tiny.seed)
    seed_everything(cfg.train.seed)
    # Data first: a bad file fails before any weights load.
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)
    stop_ids = stop_token_ids(cfg.model.path, tokenizer, cfg.model.trust_remote_code)
    data = prepare_data(cfg.data, cfg.train.objective, cfg.train.seed, tokenizer, stop_ids)
    tokenizer.chat_template = data.template  # saved with every checkpoint and the final model
    for line in data.train_report.lines():
        console.print(f"[dim]train data:[/dim] {line}", highlight=False)
    if data.train_report.from_cache:
        console.print(f"[dim]train data: loaded tokenized cache {data.fingerprint}[/dim]")
    for line in data.eval_report.lines() if data.eval_report else []:
        console.print(f"[dim]eval data:[/dim] {line}", highlight=False)

    model_path = str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path
    model_cfg = cfg.model.model_copy(update={"path": model_path})
    load_dtype = resolve_load_dtype(cfg.model, cfg.method.type, device)
    model = load_model(model_cfg, load_dtype, device, attention_for(cfg.model, cfg.data.packing))
    packing = cfg.data.packing
    if packing and not packing_supported(model, device):
        console.print(f"[yellow]{type(model).__name__} does not support padding-free packing; using padded batches")
        packing = False
    model = apply_method(model, cfg.method)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = count_parameters(model)
    console.print(f"model: {type(model).__name__} on {device}, weights {load_dtype}, autocast {precision}; {params}")

    pad_id = tokenizer.pad_token_id
    stream = MicroBatches(data.train, packing, cfg.train.batch_tokens, cfg.train.batch_size, pad_id, cfg.train.seed)
    grad_accum = cfg.train.grad_accum
    total_micro = None if cfg.train.max_steps else stream.count(cfg.train.epochs)
    total_steps = cfg.train.max_steps or math.ceil(total_micro / grad_accum)
    held_out = (
        eval_batches(data.eval, packing, cfg.train.batch_tokens, cfg.train.batch_size, pad_id) if data.eval else []
    )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.train, cfg.method.lora_plus_ratio if cfg.method.type == "lora" else None)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    state: dict[str, Any] = {"micro": 0, "tokens": 0, "elapsed": 0.0}
    start_step = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler)
        start_step = state["step"]
        console.print(f"resumed from {checkpoint} (step {start_step})")
    elif resume:
        console.print("--resume: no checkpoint yet, starting from the beginning")

    reporter = Reporter(out, total_steps, start_step, cfg.train.tensorboard)

    def run_evaluation(step: int) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        if held_out:
            row.update(evaluate_loss(model, held_out, device, autocast))
        for evaluator in evaluators:
            with autocast():
                row.update(evaluator(model, tokenizer, data.template, data.eval_records))
        if len(row) > 1:
            reporter.log(row)
        return row

    def checkpoint_now(step: int) -> None:
        trainer_state = {**state, "elapsed": state["elapsed"] + time.perf_counter() - window_start}
        save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, scaler, trainer_state,
                        cfg.train.keep_checkpoints)

    window_start = time.perf_counter()
    last_eval: dict[str, Any] = {}
    try:
        start_eval = run_evaluation(0) if cfg.train.eval_at_start and start_step == 0 else {}
        log_loss, log_tokens, log_trained, log_start = 0.0, 0, 0, time.perf_counter()
        for step in range(start_step, total_steps):
            model.train()
            end = state["micro"] + grad_accum if total_micro is None else min(state["micro"] + grad_accum, total_micro)
            window = [stream.get(m) for m in range(state["micro"], end)]
            window_trained = sum(batch.num_trained for batch in window)
            loss_value = float(backward_window(model, window, device, autocast, scaler))
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at step {step + 1}; stopped without updating the weights. "
                    f"Last good checkpoint: {latest_checkpoint(out) or 'none'}. Try a lower train.lr, "
                    "train.precision: fp32 or bf16 instead of fp16, or check the data."
                )
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = cfg.train.max_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            if not math.isfinite(grad_norm) and scaler is None:
                raise TrainingError(
                    f"gradient norm became {grad_norm} at step {step + 1}; stopped without updating the weights. "
                    f"Last good checkpoint: {latest_checkpoint(out) or 'none'}."
                )
            lr = scheduler.get_last_lr()[0]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state["micro"] = end
            step_tokens = sum(batch.num_tokens for batch in window)
            state["tokens"] += step_tokens
            log_loss += loss_value * window_trained
            log_tokens += step_tokens
            log_trained += window_trained
            done = step + 1
            reporter.advance(done)
            if done % cfg.train.log_every == 0 or done == total_steps:
                now = time.perf_counter()
                reporter.log({
                    "step": done,
                    "epoch": round(stream.progress(state["micro"]), 4),
                    "loss": log_loss / log_trained,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": state["tokens"],
                    "tokens_per_s": log_tokens / max(now - log_start, 1e-9),
                    "elapsed_s": round(state["elapsed"] + now - window_start, 2),
                    **({"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
                       if device.type == "cuda" else {}),
                })
                log_loss, log_tokens, log_trained, log_start = 0.0, 0, 0, now
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total_steps:
                last_eval = run_evaluation(done)
            if cfg.train.save_every and done % cfg.train.save_every == 0 and done != total_steps:
                checkpoint_now(done)
        if total_steps > start_step or not last_eval:
            last_eval = run_evaluation(total_steps)
        checkpoint_now(total_steps)
    finally:
        reporter.close()

    final_dir = out / "final"
    save_final(model, tokenizer, stop_ids, final_dir)
    elapsed = state["elapsed"] + time.perf_counter() - window_start
    write_run_json(out, cfg, data.fingerprint, device, precision, params, total_steps, elapsed,
                   time.perf_counter() - started, last_eval)
    console.print(f"saved {final_dir}")
    return TrainResult(out, final_dir, total_steps, last_eval, start_eval, model, tokenizer)


def save_final(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int],
               path: Path) -> None:
    """Save the trained model (HF directory) or adapter (PEFT directory), ready for inference."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.config.use_cache = True
    add_stop_ids(base.generation_config, stop_ids)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, tokenizer, tmp)
    if isinstance(model, PeftModel):
        base.generation_config.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
