"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tunelab.errors import TunelabError
from tunelab.models.adapters import decoder_layers
from tunelab.models.methods.prompt_learning import has_virtual_tokens
from tunelab.models.precision import PRECISION_DTYPES
from tunelab.train.parallel.single import Parallel


class FSDPParallel(Parallel):
    """FSDP2: ``fully_shard`` on every decoder layer, then on the whole model (embeddings, head, adapters' rest)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options = self.config.distributed.fsdp
        kwargs: dict[str, Any] = {"reshard_after_forward": options.reshard_after_forward}
        if options.mixed_precision != "none":
            dtype = PRECISION_DTYPES[options.mixed_precision]
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
