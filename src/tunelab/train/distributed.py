"""Training across processes: one process, DDP, FSDP2 (``fully_shard``) or DeepSpeed ZeRO.

The engine drives every strategy through the same :class:`Parallel` interface: backward over an
accumulation window, clip and step, evaluate, checkpoint, gather the final weights.

How a step is split. An optimizer step takes ``grad_accum × world_size`` consecutive micro-batches
of the run's single stream (the stream one process would read); process ``r`` runs micro-batches
``r, r + W, r + 2W, ...`` of that window. Every process builds the whole window (cheap: it only
collates token ids) and normalises its losses by the whole window's totals (trained tokens, pairs),
and gradients are summed across processes (the loss is scaled by W, since DDP, FSDP and DeepSpeed
average). So a step with W processes has the same loss and gradients as one process with
``grad_accum × W`` micro-batches, and the learning-rate schedule, which counts optimizer steps,
is the same. A short last window is padded with zero-weighted passes so that every process runs
the same number of forwards (FSDP and ZeRO-3 gather parameters in each one).

Only rank 0 writes metrics, progress, ``config.yaml``, checkpoints' shared files and ``final/``;
the other processes are quiet. See docs/distributed.md.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from tunelab.config import DistributedConfig, TrainConfig, TunelabConfig, dump_config
from tunelab.data.packing import Batch
from tunelab.errors import ConfigError, TunelabError, read_user_text
from tunelab.models.adapters import decoder_layers
from tunelab.models.methods.prompt_learning import has_virtual_tokens
from tunelab.models.load import resolve_device
from tunelab.train import checkpoint as checkpoints
from tunelab.train.launch import LaunchError, check_launch
from tunelab.train.objectives import Metrics, Objective
from tunelab.train.objectives.base import add_metrics
from tunelab.train.reporting import console

SHARDED_DIR = "distributed"  # inside a checkpoint: per-process RNG, FSDP (DCP) or DeepSpeed state


@dataclass(frozen=True)
class Processes:
    """This process's place in the run."""

    strategy: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (any strategy but ``none``)."""
        return self.strategy != "none"

    def barrier(self) -> None:
        """Wait for every process (no-op in one process)."""
        if self.distributed:
            dist.barrier()

    @contextmanager
    def node_main_first(self) -> Iterator[None]:
        """Run the body on each node's first process before the others (caches: write once, then read)."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (a small picklable object), in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def start_processes(config: TunelabConfig) -> tuple[Processes, torch.device]:
    """Join the process group that torchrun set up (or stay single) and pick this process's device.

    Checks the launch first (:func:`~tunelab.train.launch.check_launch`), then that the process
    group really has the launched size and that every process read the same config.

    Returns:
        The processes and this process's device (``cuda:LOCAL_RANK`` on GPUs).

    Raises:
        LaunchError: a launch that would not train as configured.
    """
    cfg = config.distributed
    world_size = check_launch(cfg, os.environ)
    if cfg.strategy == "none":
        return Processes(), resolve_device(config.train.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs are visible: start "
                              "at most one process per GPU (--nproc / --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend nccl needs GPUs; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise LaunchError(f"the process group has {dist.get_world_size()} processes (this is rank {dist.get_rank()}) "
                          f"but the launcher said WORLD_SIZE={world_size}, RANK={rank}: the processes are not one run")
    processes = Processes(cfg.strategy, rank, local_rank, world_size)
    fingerprints = processes.gather(hashlib.sha256(dump_config(config).encode()).hexdigest())
    if len(set(fingerprints)) > 1:
        differing = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
        raise LaunchError(f"processes {differing} read a different config than rank 0; give every process the same "
                          "config file and overrides")
    if not processes.is_main:
        console.quiet = True  # one voice: rank 0 prints, logs and shows progress
    if world_size == 1:
        console.print(f"[yellow]distributed.strategy {cfg.strategy} with a single process: nothing is sharded "
                      "or replicated (start more with --nproc N)")
    return processes, device


def stop_processes(processes: Processes) -> None:
    """Leave the process group at the end of a run."""
    if processes.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def window_share(window_size: int, rank: int, world_size: int) -> list[int | None]:
    """Which micro-batches of a window this process runs: ``rank, rank + W, ...``.

    Every process gets the same number of passes; ``None`` marks a padding pass (a short last
    window), which runs a micro-batch with zero weight so that collectives stay matched.
    """
    mine: list[int | None] = list(range(rank, window_size, world_size))
    passes = math.ceil(window_size / world_size)
    return mine + [None] * (passes - len(mine))


class LossModule(torch.nn.Module):
    """The model and its objective as one module.

    The distributed wrappers (DDP, FSDP's root, DeepSpeed's engine) wrap this module, so their
    hooks see the whole loss computation however the objective calls the model (a reward model
    calls its backbone and head separately, DPO switches adapters off for the reference).
    """

    def __init__(self, model: torch.nn.Module, objective: Objective, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.heads = torch.nn.ModuleDict(objective.heads())  # trained beside the model (PPO's value head)
        self.objective = objective
        self.device = device

    def forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This micro-batch's share of the window's loss, and its metrics."""
        return self.objective.loss(self.model, batch.to(self.device), totals)


class Parallel:
    """One process: plain PyTorch. The strategies below override how passes run and state is saved."""

    def __init__(self, model: torch.nn.Module, objective: Objective, processes: Processes, device: torch.device,
                 config: TunelabConfig | None) -> None:
        # config: read by the sharded strategies; None will do for a one-process evaluation.
        self.model, self.objective, self.processes, self.device = model, objective, processes, device
        self.config = config
        self.module: torch.nn.Module = LossModule(model, objective, device)
        self.trainable: list[torch.nn.Parameter] = []

    # -- set-up ------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Processes that share each optimizer step."""
        return self.processes.world_size

    def describe(self) -> str:
        """One line for the run log."""
        return "one process"

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the optimizer (DeepSpeed wraps it); called once after it is built."""
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]  # the model's, then the heads'

    @property
    def heads(self) -> torch.nn.ModuleDict:
        """The objective's own trained modules (after sharding: their parameters are the optimizer's)."""
        return self.module.heads

    def head_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every head's whole state dict, by file name (every process must call this: sharded heads gather)."""
        from torch.distributed.tensor import DTensor

        return {f"{name}.safetensors": {key: (value.full_tensor() if isinstance(value, DTensor) else value).detach()
                                        for key, value in head.state_dict().items()}
                for name, head in self.heads.items()}

    # -- one optimizer step ------------------------------------------------------------------

    def _forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        return self.module(batch, totals)

    def _accumulating(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def _backward(self, loss: torch.Tensor, scale: float, scaler: torch.amp.GradScaler | None) -> None:
        scaled = loss if scale == 1.0 else loss * scale
        (scaler.scale(scaled) if scaler else scaled).backward()

    def backward_window(self, window: Sequence[Batch], totals: dict[str, int], autocast: Callable[[], Any],
                        scaler: torch.amp.GradScaler | None, metrics: dict[str, list[float]]) -> float:
        """Forward and backward this process's share of one optimizer step's micro-batches.

        ``totals`` is the objective's :meth:`window_totals` of the whole window.

        Returns:
            The step's loss over the whole window (all processes), as one process would get it.
            The objective's metrics over the whole window are added to ``metrics``.
        """
        plan = window_share(len(window), self.processes.rank, self.world_size)
        step_loss = torch.zeros((), device=self.device, dtype=torch.float64)  # summed as exactly as the parts allow
        local: dict[str, list[float]] = {}
        for number, index in enumerate(plan):
            with self._accumulating(last=number == len(plan) - 1):
                with autocast():
                    loss, batch_metrics = self._forward(window[0 if index is None else index], totals)
                # Gradients are averaged over processes; scaling by W makes them the window's sum.
                self._backward(loss, 0.0 if index is None else float(self.world_size), scaler)
            if index is not None:
                step_loss += loss.detach().double()
                add_metrics(local, batch_metrics)
        return self._combine(step_loss, local, metrics)

    def _combine(self, loss: torch.Tensor, local: dict[str, list[float]], into: dict[str, list[float]]) -> float:
        parts = self.processes.gather((float(loss), local)) if self.processes.distributed else [(float(loss), local)]
        for _, part in parts:
            add_metrics(into, {name: (total, count) for name, (total, count) in part.items()})
        return math.fsum(value for value, _ in parts) if len(parts) > 1 else parts[0][0]

    def clip_and_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      max_grad_norm: float | None) -> float:
        """Unscale, clip to ``max_grad_norm``, step and zero the gradients; return the gradient norm.

        A non-finite norm skips the update (with fp16 the scaler also lowers its scale); the
        engine then stops the run unless a scaler is in use.
        """
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = self._grad_norm(torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm or float("inf")))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _grad_norm(self, norm: torch.Tensor) -> float:
        return float(norm)

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, batches: list[Batch], autocast: Callable[[], Any], token_loss: bool) -> dict[str, float]:
        """Held-out loss (and the objective's metrics) over all ``batches``, shared among processes.

        Args:
            token_loss: report ``eval_loss`` as the mean token loss and ``eval_ppl`` (SFT,
                pretraining); otherwise the objective's mean and ``eval_<metric>``.
        """
        was_training = self.model.training
        self.module.eval()
        totals = self.objective.window_totals(batches)
        local: dict[str, list[float]] = {}
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        with torch.no_grad():
            for index in window_share(len(batches), self.processes.rank, self.world_size):
                with autocast():
                    part, batch_metrics = self._forward(batches[0 if index is None else index], totals)
                if index is not None:
                    loss += part.double()
                    add_metrics(local, batch_metrics)
        self.module.train(was_training)
        metrics: dict[str, list[float]] = {}
        value = self._combine(loss, local, metrics)
        if token_loss:
            return {"eval_loss": value, "eval_ppl": math.exp(min(value, 50.0))}
        return {"eval_loss": value, **{f"eval_{name}": total / max(count, 1) for name, (total, count) in metrics.items()}}

    def generation_context(self) -> AbstractContextManager:
        """Where generation (evaluators) can call the model directly: parameters gathered as needed."""
        return nullcontext()

    # -- weights and checkpoints -------------------------------------------------------------------

    @contextmanager
    def full_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        """The whole model's weights for saving, on rank 0.

        Yields None when the model in memory already holds them (one process, DDP, ZeRO-1/2);
        sharded strategies yield a gathered state dict on rank 0 (None on the others). Every
        process must enter this context (it gathers).
        """
        yield None

    def save_checkpoint(self, output_dir: Path, step: int, tokenizer: PreTrainedTokenizerBase,
                        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                        scaler: torch.amp.GradScaler | None, trainer_state: dict[str, Any], keep: int) -> None:
        """Write ``checkpoints/step-N`` atomically (every process calls this)."""
        heads = self.head_states()
        if not self.processes.distributed:
            checkpoints.save_checkpoint(output_dir, step, self.model, tokenizer, optimizer, scheduler, scaler,
                                        trainer_state, keep, extra_tensors=heads)
            return
        root = checkpoints.checkpoint_root(output_dir)
        staging = root / f".tmp-step-{step}-{SHARDED_DIR}"
        if self.processes.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.processes.barrier()
        if not self.processes.is_main:
            torch.save(_rng_state(), staging / f"rng-rank{self.processes.rank}.pt")
        self.processes.barrier()  # written before rank 0 moves the staging directory into the checkpoint
        self._save_sharded_state(staging, optimizer)
        state = {**trainer_state, "strategy": self.processes.strategy, "world_size": self.world_size}
        with self.full_weights() as weights:
            if self.processes.is_main:
                checkpoints.save_checkpoint(
                    output_dir, step, self.model, tokenizer, self._replicated_optimizer(optimizer), scheduler,
                    scaler, state, keep, extra_tensors=heads, state_dict=weights,
                    extra=lambda tmp: staging.rename(tmp / SHARDED_DIR))
        self.processes.barrier()

    def _save_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        """Write the state that only exists in pieces (sharded weights, optimizer state)."""

    def _replicated_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        """The optimizer whose ``state_dict()`` rank 0 saves whole (None when it is sharded)."""
        return optimizer

    def load_checkpoint(self, path: Path, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
        """Restore weights, optimizer, schedule and RNG from a checkpoint; return the trainer state."""
        saved_world = checkpoints.read_trainer_state(path).get("world_size", 1)
        sharded = self._load_sharded_state(path / SHARDED_DIR, optimizer, saved_world)
        model, whole_optimizer = (None, None) if sharded else (self.model, optimizer)
        state = checkpoints.load_checkpoint(path, model, whole_optimizer, scheduler, scaler)
        if not sharded:  # sharded heads came back with the module's sharded state
            for name, head in self.heads.items():
                head.load_state_dict(load_file(path / f"{name}.safetensors", device=str(self.device)))
        own_rng = path / SHARDED_DIR / f"rng-rank{self.processes.rank}.pt"
        if self.processes.rank > 0 and own_rng.is_file():
            _set_rng_state(torch.load(own_rng, weights_only=True))
        return state

    def _load_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer, saved_world: int) -> bool:
        """Restore sharded weights and optimizer state; False when the checkpoint holds them whole."""
        for strategy in ("fsdp", "deepspeed"):
            if (directory / strategy).is_dir():
                raise TunelabError(f"{directory.parent} was written by distributed.strategy {strategy} (its optimizer "
                                   f"state is sharded); resume it with strategy {strategy}")
        return False


class DDPParallel(Parallel):
    """DistributedDataParallel: every process holds the whole model; gradients are all-reduced once a step."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (rotary tables) are identical everywhere: no broadcast before every forward.
        self.ddp = DistributedDataParallel(self.module, device_ids=device_ids, broadcast_buffers=False)

    def describe(self) -> str:
        return f"DDP over {self.world_size} processes"

    def _forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        return self.ddp(batch, totals)

    def _accumulating(self, last: bool) -> AbstractContextManager:
        return nullcontext() if last else self.ddp.no_sync()  # one all-reduce per optimizer step


class FSDPParallel(Parallel):
    """FSDP2: ``fully_shard`` on every decoder layer, then on the whole model (embeddings, head, adapters' rest)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options = self.config.distributed.fsdp
        kwargs: dict[str, Any] = {"reshard_after_forward": options.reshard_after_forward}
        if options.mixed_precision != "none":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[options.mixed_precision]
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if options.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        for layer in decoder_layers(base):
            fully_shard(layer, **kwargs)
        fully_shard(self.module, **kwargs)
        self.options = options

    def describe(self) -> str:
        extras = [name for name, on in (("CPU offload", self.options.cpu_offload),
                                        (f"{self.options.mixed_precision} parameters",
                                         self.options.mixed_precision != "none")) if on]
        return f"FSDP2 over {self.world_size} processes" + (f" ({', '.join(extras)})" if extras else "")

    def _grad_norm(self, norm: torch.Tensor) -> float:
        from torch.distributed.tensor import DTensor

        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _prompt_learning(self) -> bool:
        return has_virtual_tokens(self.model)

    def generation_context(self) -> AbstractContextManager:
        return self._root_unsharded()

    @contextmanager
    def _root_unsharded(self) -> Iterator[None]:
        # The root's parameters (embeddings, head, virtual tokens) are gathered by its forward only;
        # generation calls the model directly. The layers gather their own in their hooks, which
        # needs the root initialised first (its first forward does that; generation can come first:
        # an evaluation at step 0, online RL's rollouts). FSDP2 has no public call for it.
        self.module._get_fsdp_state()._lazy_init()
        self.module.unshard()
        try:
            yield
        finally:
            self.module.reshard()

    @contextmanager
    def full_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        adapters_only = isinstance(self.model, PeftModel)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapters_only)
        weights = get_model_state_dict(self.model, options=options)
        # PEFT computes a prompt-learning adapter from its module rather than reading the state dict.
        with self._root_unsharded() if self._prompt_learning() else nullcontext():
            yield weights if self.processes.is_main else None

    def _replicated_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def _state_options(self, loading: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # A frozen base (LoRA, prefix) never changes: the sharded state holds what trains, and
        # loading it leaves the frozen weights as loaded.
        return StateDictOptions(ignore_frozen_params=True, strict=not loading)

    def _save_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.module, optimizer, options=self._state_options())
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory / "fsdp")

    def _load_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer, saved_world: int) -> bool:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (directory / "fsdp").is_dir():
            raise TunelabError(f"{directory.parent}: no FSDP state in this checkpoint (written by a run with another "
                               "distributed.strategy); resume with the strategy that wrote it")
        # DCP reshards on load: a checkpoint written by N processes resumes on any number.
        options = self._state_options(loading=True)
        model_state, optimizer_state = get_state_dict(self.module, optimizer, options=options)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory / "fsdp")
        set_state_dict(self.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)
        return True


class DeepSpeedParallel(Parallel):
    """DeepSpeed ZeRO stage 1, 2 or 3 with tunelab's optimizer and schedule."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.engine: Any = None
        self.stage = self.config.distributed.deepspeed.zero_stage

    def describe(self) -> str:
        options = self.config.distributed.deepspeed
        extras = [name for name, on in (("optimizer offload", options.offload_optimizer),
                                        ("parameter offload", options.offload_params)) if on]
        return f"DeepSpeed ZeRO-{self.stage} over {self.world_size} processes" + (
            f" ({', '.join(extras)})" if extras else "")

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        deepspeed = import_deepspeed(self.device)
        config = deepspeed_config(self.config.distributed, self.config.train, self.world_size, self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=config)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        return self.engine(batch, totals)

    def _accumulating(self, last: bool) -> AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def _backward(self, loss: torch.Tensor, scale: float, scaler: torch.amp.GradScaler | None) -> None:
        self.engine.backward(loss * scale, scale_wrt_gas=False)

    def clip_and_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      max_grad_norm: float | None) -> float:
        # DeepSpeed clips (config gradient_clipping) and zeroes the gradients inside its step.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def generation_context(self) -> AbstractContextManager:
        return nullcontext()  # ZeRO-3's module hooks gather parameters whichever module is called

    @contextmanager
    def full_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        if self.stage != 3:
            yield None  # ZeRO-1/2 keep whole parameters in every process
            return
        # Gathered layer by layer onto rank 0's CPU (prefix/prompt tuning is refused with ZeRO-3 by the config).
        adapters_only = isinstance(self.model, PeftModel)
        gathered = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=adapters_only)
        yield {name.removeprefix("model."): tensor for name, tensor in gathered.items()} if gathered else None

    def _replicated_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def _save_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        # A frozen base (LoRA, prefix) never changes: the sharded state holds what trains.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def _load_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer, saved_world: int) -> bool:
        if not (directory / "deepspeed").is_dir():
            raise TunelabError(f"{directory.parent}: no DeepSpeed state in this checkpoint (written by a run with "
                               "another distributed.strategy); resume with the strategy that wrote it")
        if saved_world != self.world_size:
            raise TunelabError(
                f"{directory.parent} was written by {saved_world} processes; a DeepSpeed ZeRO checkpoint resumes "
                f"with the same number (--nproc {saved_world}). To change it, convert the checkpoint with "
                "DeepSpeed's ds_to_universal.py, or start a new run from its model directory"
            )
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=False)
        if path is None:
            raise TunelabError(f"{directory / 'deepspeed'}: DeepSpeed could not load this checkpoint")
        return True


STRATEGIES: dict[str, type[Parallel]] = {
    "none": Parallel, "ddp": DDPParallel, "fsdp": FSDPParallel, "deepspeed": DeepSpeedParallel,
}


def parallelize(model: torch.nn.Module, objective: Objective, processes: Processes, device: torch.device,
                config: TunelabConfig) -> Parallel:
    """Wrap the model for ``processes.strategy``; build the optimizer after this (FSDP replaces parameters)."""
    return STRATEGIES[processes.strategy](model, objective, processes, device, config)


# ---------------------------------------------------------------------------------------------
# DeepSpeed configuration

# Keys tunelab always sets from train.*: a user's file may repeat them ("auto" or the same value).
OWNED_DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "gradient_clipping")


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed (on its CPU accelerator when training on CPU), or say how to install it."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("distributed.strategy deepspeed: DeepSpeed is not installed; "
                          "pip install --no-build-isolation 'tunelab[deepspeed]'") from None
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_config(cfg: DistributedConfig, train: TrainConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config for tunelab's loop, with ``distributed.deepspeed.config_file`` merged over it.

    The batch keys only describe tunelab's own accumulation to DeepSpeed (tunelab marks the
    accumulation boundary itself); the optimizer and schedule are tunelab's.

    Raises:
        ConfigError: the file is missing or not JSON, sets the optimizer or scheduler, or sets an owned key
            or the ZeRO stage differently.
    """
    import json

    options = cfg.deepspeed
    pin = device.type == "cuda"
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload runs tunelab's torch AdamW on the CPU copy
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if options.config_file is None:
        return config
    path = Path(options.config_file).expanduser()
    try:  # read here, once: the config only holds the path
        user = json.loads(read_user_text(path, "DeepSpeed config file", ConfigError))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    owned = sorted({"optimizer", "scheduler"} & set(user))
    if owned:
        raise ConfigError(f"{path}: remove {', '.join(owned)}; tunelab builds the optimizer and schedule from "
                          "train.lr, train.schedule, train.weight_decay ...")
    for key in OWNED_DEEPSPEED_KEYS:
        if key in user and user[key] != "auto" and user[key] != config[key]:
            raise ConfigError(f"{path}: {key} is {user[key]!r} but tunelab runs {config[key]!r} (from train.* and the "
                              "process count); remove it or set it to \"auto\"")
    merged = _merge(config, {k: v for k, v in user.items() if k not in OWNED_DEEPSPEED_KEYS})
    stage = merged["zero_optimization"].get("stage", options.zero_stage)
    if stage != options.zero_stage:
        raise ConfigError(f"{path}: zero_optimization.stage is {stage} but distributed.deepspeed.zero_stage is "
                          f"{options.zero_stage}; set the stage in one place")
    return merged


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


# ---------------------------------------------------------------------------------------------
# Per-process RNG (rank 0's lives in the checkpoint's rng.pt and trainer_state.json)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


__all__ = ["LaunchError", "Parallel", "Processes", "deepspeed_config", "parallelize", "start_processes",
           "stop_processes", "window_share"]
