"""The training loop: one engine for every objective, in plain PyTorch.

Reads top to bottom: set up (output dir, seed, device, tokenizer, data, model, method, optimizer,
resume), train (accumulate, clip, step, log, evaluate, checkpoint), save (final model, run.json).
A step's work comes from a source: the offline one reads ``grad_accum`` micro-batches of the
tokenized data (:mod:`tunelab.train.steps`); the online one samples, scores and hands rollouts to
an online objective, whose step is ``update_epochs × minibatches`` optimizer steps
(:mod:`tunelab.train.rl.source`). Which objective and what it needs (data kind, reference,
packing, online) comes from the registry (:mod:`tunelab.train.objectives.registry`).
The loss of an optimizer step is the summed loss of its micro-batches divided by the trained units
of the whole window, so accumulation equals one big batch exactly. How the passes,
steps, evaluations and checkpoints run across processes (one process, DDP, FSDP2, DeepSpeed ZeRO)
is :mod:`tunelab.train.parallel`'s job; the loop is the same for all.
"""

from __future__ import annotations

import math
import random
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
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import TunelabConfig
from tunelab.data.packing import packed_lengths_tensor
from tunelab.data.kinds import check_data_kind
from tunelab.data.templates import resolve_template
from tunelab.data.tokenize import default_cache_dir, prepare_data
from tunelab.errors import TrainingError
from tunelab.faults import crash_point
from tunelab.models.adapters import count_parameters
from tunelab.models.methods import apply_method, method_spec, packing_conflict
from tunelab.models.methods.lora import save_initial_adapter, save_pissa_as_lora
from tunelab.models.load import add_stop_ids, attention_for, load_model, load_tokenizer, resolve_load_dtype, stop_token_ids
from tunelab.models.precision import autocast_dtype, resolve_precision
from tunelab.models.attention import VARLEN_NAME
from tunelab.models.quant import is_quantized, route_unfit_cpu_4bit_layers, weight_memory
from tunelab.models.tiny import create_tiny_model
from tunelab.outputs import remove, replace_with, temporary_sibling, write_errors
from tunelab.train.batches import MicroBatches, eval_batches
from tunelab.train.checkpoint import latest_checkpoint, save_model_dir
from tunelab.train.speed import apply_speed_switches
from tunelab.train.stop import StopOnSignal, TrainingStopped
from tunelab.train.parallel import Processes, parallelize, start_processes, stop_processes
from tunelab.train.objectives import build_objective, objective_spec
from tunelab.train.objectives.registry import objective_data_kinds
from tunelab.train.objectives.base import add_metrics
from tunelab.train.reference import attach_reference_logps, frozen_copy
from tunelab.train.neftune import NEFTune
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.reporting import Reporter, console
from tunelab.train.rl.generators import build_generator
from tunelab.train.rl.source import Reward, RolloutSource, load_prompt_sets, prompts_fingerprint
from tunelab.train.run_dir import RunDirectory
from tunelab.train.run_info import write_run_json
from tunelab.train.steps import OfflineSource

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


def ensure_tiny_model(cfg: TunelabConfig) -> None:
    """Build the config's tiny model at ``model.path`` when it asks for one and nothing is there."""
    tiny = cfg.model.tiny
    if tiny is not None and not Path(cfg.model.path).exists():
        console.print(f"building a tiny model at {cfg.model.path}")
        create_tiny_model(cfg.model.path, arch=tiny.arch, hidden=tiny.hidden, layers=tiny.layers, heads=tiny.heads,
                          vocab=tiny.vocab, tokenizer_corpus=tiny.tokenizer_corpus, seed=tiny.seed)


def packing_supported(model: PreTrainedModel, device: torch.device) -> bool:
    """Check on the real model that a packed row gives the same hidden states as separate sequences.

    Models whose attention ignores restarting ``position_ids`` would attend across sequences;
    for them the engine falls back to padded batches.
    """
    generator = torch.Generator().manual_seed(0)
    high = min(model.config.vocab_size, 1000)
    first = torch.randint(1, high, (1, 6), generator=generator).to(device)
    second = torch.randint(1, high, (1, 4), generator=generator).to(device)
    was_training = model.training
    model.eval()
    backbone = model.base_model  # the decoder without its head (LM or reward)
    with torch.no_grad():
        separate = torch.cat([backbone(first, use_cache=False).last_hidden_state,
                              backbone(second, use_cache=False).last_hidden_state], dim=1)
        positions = torch.tensor([list(range(6)) + list(range(4))], device=device)
        packed = backbone(torch.cat([first, second], dim=1), position_ids=positions, use_cache=False,
                          packed_seq_lens=packed_lengths_tensor([[6, 4]])).last_hidden_state
    model.train(was_training)
    error = (packed.float() - separate.float()).abs().max() / separate.float().abs().max().clamp_min(1e-6)
    return bool(error < 1e-2)


def train(
    config: TunelabConfig,
    resume: bool = False,
    overwrite: bool = False,
    evaluators: Sequence[Evaluator] = (),
) -> TrainResult:
    """Run a fine-tune from a validated config: any registered objective, offline or online.

    Args:
        config: the run configuration.
        resume: continue from the newest checkpoint in ``output_dir`` (a fresh start if none).
        overwrite: delete an earlier run in ``output_dir`` instead of refusing to start.
        evaluators: extra held-out metrics, called at every evaluation (online objectives give
            them the held-out prompts as records).

    Returns:
        The output locations and final metrics.

    Raises:
        TunelabError: bad config, data or model; TrainingError when the loss becomes NaN/inf.
    """
    started = time.perf_counter()
    processes, device = start_processes(config)  # one process, or this one's place among torchrun's
    run_dir = RunDirectory(config, resume, overwrite, main=processes.is_main)  # only rank 0 writes the run's files
    run_dir.open()  # locked, checked and cleaned before anything slow
    try:
        processes.barrier()
        return _train(config, processes, device, run_dir, evaluators, started)
    finally:
        run_dir.close()


def _train(cfg: TunelabConfig, processes: Processes, device: torch.device, run_dir: RunDirectory,
           evaluators: Sequence[Evaluator], started: float) -> TrainResult:
    out = run_dir.path
    spec = objective_spec(cfg.train.objective)
    precision = resolve_precision(cfg.train.precision, device)
    with processes.node_main_first():
        ensure_tiny_model(cfg)
    seed_everything(cfg.train.seed)
    # Data first: a bad file fails before any weights load.
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)
    stop_ids = stop_token_ids(cfg.model.path, tokenizer, cfg.model.trust_remote_code)
    data = prompts = held_prompts = reward = None
    check_data_kind([*cfg.data.train, *(cfg.data.eval or [])], cfg.train.objective, objective_data_kinds())
    if spec.online:  # prompts, answered by the policy itself; each process reads them (cheap)
        template = resolve_template(tokenizer, cfg.data.template)
        prompts, held_prompts = load_prompt_sets(cfg, tokenizer, template)
        fingerprint = prompts_fingerprint(cfg.data.train)
        reward = Reward(cfg.objective_settings, device)
    else:
        with processes.node_main_first():  # tokenized once per node and cached; the other processes read the cache
            data = prepare_data(cfg.data, spec.data, cfg.train.seed, tokenizer, stop_ids)
        template, fingerprint = data.template, data.fingerprint
        for line in data.train_report.lines():
            console.print(f"[dim]train data:[/dim] {line}", highlight=False)
        if data.train_report.from_cache:
            console.print(f"[dim]train data: loaded tokenized cache {data.fingerprint}[/dim]")
        for line in data.eval_report.lines() if data.eval_report else []:
            console.print(f"[dim]eval data:[/dim] {line}", highlight=False)
    tokenizer.chat_template = template  # saved with every checkpoint and the final model

    model_path = str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path
    model_cfg = cfg.model.model_copy(update={"path": model_path, "quantization": cfg.base_quantization})
    method = method_spec(cfg.method.type)
    load_dtype = resolve_load_dtype(cfg.model, not method.trains_base, device)
    packing = cfg.data.packing and spec.packing
    if packing and (conflict := packing_conflict(cfg.method)):
        console.print(f"[yellow]data.packing off: {conflict}; using padded batches")
        packing = False
    attention = attention_for(cfg.model, packing)
    model = load_model(model_cfg, load_dtype, device, attention, spec.score_head)
    if is_quantized(model):
        console.print(f"model: {cfg.base_quantization} base, {weight_memory(model)}")
        if unfit := route_unfit_cpu_4bit_layers(model):
            console.print(f"model: {len(unfit)} 4-bit layers have sizes bitsandbytes' fused CPU kernel cannot take "
                          f"(e.g. {unfit[0]}): they run on its generic path outside training too")
    if spec.score_head:
        model.config.pad_token_id = tokenizer.pad_token_id  # transformers' pooling finds the last token by it
    if packing and not packing_supported(model, device):
        console.print(f"[yellow]{type(model).__name__} does not support padding-free packing; using padded batches")
        packing = False
    precision_context = autocast_factory(device, precision)
    reference = None
    if spec.uses_reference(cfg.objective_settings):
        if spec.reference_precomputed(cfg.objective_settings):  # the model is still the reference
            cache = (Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()) / fingerprint

            def with_reference(split: datasets.Dataset, name: str) -> datasets.Dataset:
                return attach_reference_logps(model, split, cache / f"reference-{name}", model_path, packing,
                                              cfg.train.batch_tokens, cfg.train.batch_size, tokenizer.pad_token_id,
                                              device, precision_context)

            with processes.node_main_first():
                data.train = with_reference(data.train, "train")
                data.eval = with_reference(data.eval, "eval") if data.eval is not None else None
            console.print("[dim]reference log-probs: precomputed and cached (no reference forward per step)[/dim]")
        elif method.trains_base:  # PEFT methods switch their adapters off instead
            reference = frozen_copy(model)
            console.print("[dim]reference model: a frozen copy of the starting weights[/dim]")
        else:
            console.print("[dim]reference model: the base with LoRA adapters switched off (no second copy)[/dim]")
    model = apply_method(model, cfg.method, "SEQ_CLS" if spec.score_head else "CAUSAL_LM")
    pissa_init = out / "pissa_init" if cfg.method.uses_pissa else None  # final/ is saved as a LoRA of the base
    if pissa_init is not None and processes.is_main:
        save_initial_adapter(model, pissa_init)
    if spec.score_head and method.trains_base:
        model.score.requires_grad_(True)  # a new head always trains (freeze would leave it frozen)
    objective = build_objective(cfg, reference, model)
    for head in objective.heads().values():
        head.to(device)
    activations = autocast_dtype(precision) or load_dtype
    apply_speed_switches(cfg, model, objective, device, packing and attention == VARLEN_NAME, activations)
    neftune = NEFTune(model, cfg.train.neftune_alpha) if cfg.train.neftune_alpha else None
    params = count_parameters(model)
    console.print(f"model: {type(model).__name__} on {device}, weights {load_dtype}, autocast {precision}; {params}")

    parallel = parallelize(model, objective, processes, device, cfg)  # FSDP shards here: before the optimizer
    autocast = precision_context
    reporter: Reporter | None = None
    source: OfflineSource | RolloutSource
    if spec.online:
        generator = build_generator(cfg, tokenizer, stop_ids, model_path, device, activations)
        source = RolloutSource(cfg, objective, generator, tokenizer, prompts, held_prompts, reward, model, device,
                               autocast, cfg.eval.generate_samples or 64, parallel.generation_context,
                               lambda text: reporter.phase(text) if reporter else None)
        eval_records = source.held_out_records()
        steps_per_step = objective.optimizer_steps_per_step  # optimizer steps of one RL step
        grad_accum = None
    else:
        pad_id = tokenizer.pad_token_id
        stream = MicroBatches(data.train, packing, cfg.train.batch_tokens, cfg.train.batch_size, pad_id, cfg.train.seed)
        grad_accum = cfg.train.grad_accum * processes.world_size  # micro-batches per optimizer step, all processes
        held_out = (eval_batches(data.eval, packing, cfg.train.batch_tokens, cfg.train.batch_size, pad_id)
                    if data.eval else [])
        source = OfflineSource(stream, objective, grad_accum, cfg.train.epochs, cfg.train.max_steps, held_out,
                               token_loss=spec.token_level)
        eval_records, steps_per_step = data.eval_records, 1
    total_steps = source.total_steps()

    optimizer = build_optimizer(model, cfg.train, cfg.method.lora_plus_lr_ratio)
    for head in parallel.heads.values():  # after sharding: the parameters the strategy trains
        optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
    scheduler = build_scheduler(optimizer, cfg.train, total_steps * steps_per_step)
    parallel.attach(optimizer)  # DeepSpeed wraps the optimizer here
    if processes.distributed:
        split = (f"{grad_accum} micro-batches per optimizer step ({cfg.train.grad_accum} per process)"
                 if grad_accum else "every process samples the step's rollouts; the update is split")
        console.print(f"training: {parallel.describe()}; {split}")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    # The open logging window and the last evaluation are part of the state, so a resumed run logs
    # exactly what the uninterrupted one logs whatever log_every and save_every are.
    state: dict[str, Any] = {"tokens": 0, "elapsed": 0.0, "log_window": new_log_window(), "last_eval": {}}
    start_step = 0
    checkpoint = run_dir.checkpoint()
    if checkpoint is not None:
        state = {**state, **parallel.load_checkpoint(checkpoint, optimizer, scheduler, scaler)}
        start_step = state["step"]
        source.load_state_dict(state)
        if spec.online:
            objective.load_state_dict(state)
        console.print(f"resumed from {checkpoint} (step {start_step})")
    elif run_dir.resume:
        console.print("--resume: no checkpoint to resume from, starting from the beginning")

    run_dir.write_config()
    reporter = Reporter(out, total_steps, start_step, cfg.train.tensorboard, processes.is_main)

    def run_evaluation(step: int) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step, **source.evaluate(parallel, autocast)}
        for evaluator in evaluators:
            with autocast(), parallel.generation_context():
                row.update(evaluator(model, tokenizer, template, eval_records))
        if len(row) > 1:
            reporter.log(row)
        return row

    def checkpoint_now(step: int) -> None:
        trainer_state = {**state, **source.state_dict(), **(objective.state_dict() if spec.online else {}),
                         "elapsed": state["elapsed"] + time.perf_counter() - window_start, "last_eval": last_eval}
        with write_errors(out / "checkpoints" / f"step-{step}", f"checkpoint of step {step}",
                          kept=lambda: kept_checkpoint(out)):
            parallel.save_checkpoint(out, step, tokenizer, optimizer, scheduler, scaler, trainer_state,
                                     cfg.train.keep_checkpoints)

    window_start = time.perf_counter()
    last_eval: dict[str, Any] = state["last_eval"]
    stop = StopOnSignal(enabled=not processes.distributed)  # SIGTERM/SIGINT: checkpoint, then stop
    try:
        start_eval = run_evaluation(0) if cfg.train.eval_at_start and start_step == 0 else {}
        log = state["log_window"]  # sums since the last metrics row, saved with every checkpoint
        log_tokens, log_start = 0, time.perf_counter()  # this process's throughput only
        for step in range(start_step, total_steps):
            model.train()
            work = source.step(step)  # online: rollouts, rewards and advantages first
            losses, grad_norms = [], []
            for window in work.windows:  # one optimizer step each
                totals = objective.window_totals(window)
                loss_value = parallel.backward_window(window, totals, autocast, scaler, log["metrics"])
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"loss became {loss_value} at step {step + 1}; stopped without updating the weights. "
                        f"Last good checkpoint: {latest_checkpoint(out) or 'none'}. Try a lower train.lr, "
                        "train.precision: fp32 or bf16 instead of fp16, or check the data."
                    )
                lr = scheduler.get_last_lr()[0]
                grad_norm = parallel.clip_and_step(optimizer, scaler, cfg.train.max_grad_norm)  # skips a non-finite step
                if not math.isfinite(grad_norm) and scaler is None:
                    raise TrainingError(
                        f"gradient norm became {grad_norm} at step {step + 1}; stopped without updating the weights. "
                        f"Last good checkpoint: {latest_checkpoint(out) or 'none'}."
                    )
                scheduler.step()
                losses.append(loss_value)
                grad_norms.append(grad_norm)
            source.updated()
            step_loss = losses[0] if len(losses) == 1 else float(np.mean(losses))
            grad_norm = grad_norms[0] if len(grad_norms) == 1 else float(np.mean(grad_norms))
            state["tokens"] += work.tokens
            log["loss"] += step_loss * work.weight
            log["units"] += work.weight
            add_metrics(log["metrics"], {name: (value, 1) for name, value in work.metrics.items()})
            log_tokens += work.tokens
            done = step + 1
            reporter.advance(done)
            crash_point(f"step {done}")
            if done % cfg.train.log_every == 0 or done == total_steps:
                now = time.perf_counter()
                reporter.log({
                    "step": done,
                    "epoch": round(source.progress(done), 4),
                    "loss": log["loss"] / log["units"],
                    **{name: total / max(count, 1) for name, (total, count) in log["metrics"].items()},
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": state["tokens"],
                    "tokens_per_s": log_tokens / max(now - log_start, 1e-9),
                    "elapsed_s": round(state["elapsed"] + now - window_start, 2),
                    **({"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
                       if device.type == "cuda" else {}),
                })
                log = state["log_window"] = new_log_window()
                log_tokens, log_start = 0, now
            if due_before_end(cfg.train.eval_every, done, total_steps):
                last_eval = run_evaluation(done)
            if due_before_end(cfg.train.save_every, done, total_steps):
                checkpoint_now(done)
            if stop.requested and done < total_steps:
                if not due_before_end(cfg.train.save_every, done, total_steps):
                    checkpoint_now(done)
                raise TrainingStopped(f"stopped by {stop.requested} after step {done} of {total_steps}; checkpoint "
                                      f"{latest_checkpoint(out)}; continue with: tunelab train CONFIG --resume")
        if total_steps > start_step or not last_eval:
            last_eval = run_evaluation(total_steps)
        if total_steps > start_step:  # resumed from the last step's checkpoint: it is already there
            checkpoint_now(total_steps)
    finally:
        stop.restore()
        reporter.close()
        if neftune is not None:
            neftune.remove()

    final_dir = out / "final"
    heads = parallel.head_states()  # gathered from the shards in a sharded run (every process)
    with parallel.full_weights() as weights:  # gathered from the shards in a sharded run
        if processes.is_main:
            with write_errors(final_dir, "final model", kept=f"checkpoints/step-{total_steps} holds the trained "
                              "weights; free space and run again with --resume to write final/"):
                save_final(model, tokenizer, stop_ids, final_dir, pissa_init, weights,
                           extra=(lambda tmp: save_heads(tmp, heads)) if heads else None)
    elapsed = state["elapsed"] + time.perf_counter() - window_start
    if processes.is_main:
        with write_errors(out / "run.json", "run record", kept=f"{final_dir} and the checkpoints are complete"):
            write_run_json(out, cfg, fingerprint, device, precision, params, total_steps, elapsed,
                           time.perf_counter() - started, last_eval)
    stop_processes(processes)
    console.print(f"saved {final_dir}")
    return TrainResult(out, final_dir, total_steps, last_eval, start_eval, model, tokenizer)


def save_heads(directory: Path, heads: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write the objective's own trained modules (e.g. ``value_head.safetensors``) beside the model."""
    for name, tensors in heads.items():
        save_file({key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}, str(directory / name))


def kept_checkpoint(out: Path) -> str:
    """What a failed checkpoint write leaves to resume from, for its error message."""
    previous = latest_checkpoint(out)
    kept = f"{previous} is the newest intact checkpoint" if previous else "no checkpoint was written yet"
    return f"{kept}; free space and run again with --resume"


def new_log_window() -> dict[str, Any]:
    """Sums since the last metrics row: loss times trained units, units, and the objective's [sum, count] metrics."""
    return {"loss": 0.0, "units": 0, "metrics": {}}


def due_before_end(every: int, done: int, total: int) -> bool:
    """Whether an every-N-steps action (evaluation, checkpoint) falls on step ``done``; the last step has its own."""
    return bool(every) and done % every == 0 and done != total


def autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    """A function returning the autocast context for the run's precision (or a no-op)."""
    dtype = autocast_dtype(precision)
    return lambda: torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def save_final(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int],
               path: Path, pissa_init: Path | None = None, state_dict: dict[str, torch.Tensor] | None = None,
               extra: Callable[[Path], None] | None = None) -> None:
    """Save the trained model (HF directory) or adapter (PEFT directory), ready for inference.

    Written beside ``path``, flushed to disk and renamed into place. A PiSSA adapter is saved as an
    ordinary LoRA of the original base (``pissa_init``: its initial state). ``state_dict``: the
    weights gathered from a sharded run (None: the model's own). ``extra`` adds files (e.g. PPO's
    value head) before the rename.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.config.use_cache = True
    generates = base.can_generate()  # a reward model (sequence classifier) has no generation config
    if generates:
        add_stop_ids(base.generation_config, stop_ids)
    tmp = temporary_sibling(path)
    remove(tmp)
    try:
        save_model_dir(model, tokenizer, tmp, state_dict)
        if pissa_init is not None:
            save_pissa_as_lora(model, tmp, pissa_init)
        if isinstance(model, PeftModel) and generates:
            base.generation_config.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        crash_point(f"final {path.name} before rename")
        replace_with(tmp, path)  # flushed to disk, then renamed; an older final/ is deleted only afterwards
    finally:
        remove(tmp)
    crash_point(f"final {path.name} renamed")
