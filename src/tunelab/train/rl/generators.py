"""Rollout generation behind one interface, chosen by the online objective's ``rollout_generator``.

- ``batched`` (default): the policy in memory, ``generation_batch_size`` sequences per
  ``model.generate`` call with the KV cache (:func:`~tunelab.train.rl.rollout.generate_rollouts`).
- ``one_by_one``: the same, one sequence per call (what a plain loop does; for comparison).
- ``vllm``: a vLLM engine colocated in the training process on the same GPU, its memory capped
  by ``vllm_gpu_memory_utilization`` (of the objective's section); the policy's weights (LoRA merged in) are loaded into
  it after every update, before the next rollouts. Needs ``pip install vllm`` and a CUDA GPU.

Every generator takes rendered prompt token ids and returns :class:`~tunelab.train.rl.rollout.Rollouts`
(completions cut after their first stop id, which is kept), samples of a prompt consecutive.
The local generators sample from exactly the distribution the losses score (temperature and
top-p only); vLLM samples with the same settings from its own kernels, so its samples differ
from the local generator's for the same seed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from tunelab.config import TunelabConfig
from tunelab.errors import ConfigError
from tunelab.train.rl.rollout import Rollouts, _cut_at_stop, generate_rollouts


class RolloutGenerator(Protocol):
    """Samples answers to prompts from the current policy."""

    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 temperature: float, seed: int) -> Rollouts:
        """``num_samples`` answers to each prompt (temperature 0: greedy), seeded."""
        ...

    def weights_changed(self) -> None:
        """The policy was updated: the next :meth:`generate` must sample from the new weights."""
        ...


class LocalGenerator:
    """The policy in memory generates, ``batch_size`` sequences per ``generate`` call (1: one by one)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, top_p: float, stop_ids: set[int],
                 batch_size: int) -> None:
        self.tokenizer, self.max_new_tokens, self.top_p = tokenizer, max_new_tokens, top_p
        self.stop_ids, self.batch_size = set(stop_ids), batch_size

    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 temperature: float, seed: int) -> Rollouts:
        """Sample with :func:`~tunelab.train.rl.rollout.generate_rollouts`."""
        return generate_rollouts(model, self.tokenizer, prompt_ids, num_samples, self.max_new_tokens, temperature,
                                 self.top_p, self.stop_ids, seed, self.batch_size)

    def weights_changed(self) -> None:
        """Nothing to do: it generates with the model itself."""


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's names, LoRA adapters merged in (what vLLM loads).

    A LoRA model is merged in place, read, and unmerged again (the adapters keep training).
    """
    if not isinstance(model, PeftModel):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    model.merge_adapter()
    try:
        prefix = "base_model.model."
        weights = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name or ".original_module." in name:
                continue
            clean = name.removeprefix(prefix).replace(".base_layer", "").replace(".modules_to_save.default", "")
            weights[clean] = tensor.detach().clone()
        return weights
    finally:
        model.unmerge_adapter()


def _vllm_model(llm: Any) -> Any:
    """The torch model inside a colocated (in-process) vLLM engine."""
    worker = llm.llm_engine.model_executor.driver_worker
    worker = getattr(worker, "worker", worker)  # V1 wraps the GPU worker
    return worker.model_runner.model


class VLLMGenerator:
    """A colocated vLLM engine, synced with the policy after every update.

    Args:
        model_path: the policy's starting weights (an HF directory; an adapter's base).
        gpu_memory_utilization: the share of the GPU's memory vLLM may take (weights, KV cache).
        max_model_len: the longest prompt + answer (``data.max_length``).
        dtype: the dtype vLLM computes in.
        seed: the engine's seed (each call also seeds its requests).
    """

    def __init__(self, model_path: str, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, top_p: float,
                 stop_ids: set[int], gpu_memory_utilization: float, max_model_len: int, dtype: str, seed: int,
                 vllm_module: Any = None) -> None:
        if vllm_module is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: weights load directly
            import vllm as vllm_module
        self.vllm = vllm_module
        self.max_new_tokens, self.top_p, self.stop_ids = max_new_tokens, top_p, set(stop_ids)
        self.llm = vllm_module.LLM(model=model_path, tokenizer=model_path, gpu_memory_utilization=gpu_memory_utilization,
                                   max_model_len=max_model_len, dtype=dtype, seed=seed, enable_prefix_caching=True)
        self.eos_id = tokenizer.eos_token_id
        self.stale = True  # the first generation loads the policy itself (a merged starting adapter too)

    def weights_changed(self) -> None:
        """Load the new weights before the next generation."""
        self.stale = True

    def sync(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights (LoRA merged) into the engine and drop its prefix cache."""
        _vllm_model(self.llm).load_weights(merged_weights(model).items())
        self.llm.reset_prefix_cache()
        self.stale = False

    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 temperature: float, seed: int) -> Rollouts:
        """Sample with vLLM: one request per prompt with ``n = num_samples``, seeded ``seed + prompt index``."""
        if self.stale:
            self.sync(model)
        sampling = temperature > 0
        params = [self.vllm.SamplingParams(
            n=num_samples, temperature=temperature if sampling else 0.0, top_p=self.top_p if sampling else 1.0,
            top_k=-1 if sampling else 1, max_tokens=self.max_new_tokens, stop_token_ids=sorted(self.stop_ids),
            seed=seed + index, detokenize=False) for index in range(len(prompt_ids))]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        rollouts = Rollouts(num_samples=num_samples)
        for index, (prompt, output) in enumerate(zip(prompt_ids, outputs, strict=True)):
            for sample in output.outputs:
                ids = list(sample.token_ids)
                if sample.finish_reason == "stop" and not (ids and ids[-1] in self.stop_ids):
                    # vLLM leaves a special stop token (EOS) out of the text; the policy must learn to emit it
                    stop = sample.stop_reason if isinstance(sample.stop_reason, int) else self.eos_id
                    if stop is not None:
                        ids.append(stop)
                completion, finished = _cut_at_stop(ids, self.stop_ids)
                rollouts.prompt_index.append(index)
                rollouts.prompt_ids.append(list(prompt))
                rollouts.completion_ids.append(completion)
                rollouts.finished.append(finished)
        return rollouts


def vllm_unavailable(device: torch.device) -> str | None:
    """Why ``rollout_generator: vllm`` cannot run here (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'tunelab[vllm]'; it needs a CUDA GPU)"
    if device.type != "cuda":
        return f"vLLM generates on CUDA GPUs only (this run is on {device.type})"
    return None


def build_generator(cfg: TunelabConfig, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int], model_path: str,
                    device: torch.device, dtype: torch.dtype) -> RolloutGenerator:
    """The rollout generator the online objective's ``rollout_generator`` names.

    Raises:
        ConfigError: ``vllm`` where it is not installed or there is no GPU.
    """
    t = cfg.objective_settings
    if t.rollout_generator == "vllm":
        if (reason := vllm_unavailable(device)) is not None:
            raise ConfigError(f"{cfg.train.objective}.rollout_generator vllm: {reason}; use rollout_generator batched")
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
        return VLLMGenerator(model_path, tokenizer, t.max_new_tokens, t.top_p, stop_ids,
                             t.vllm_gpu_memory_utilization, cfg.data.max_length, name, cfg.train.seed)
    batch_size = 1 if t.rollout_generator == "one_by_one" else t.generation_batch_size
    return LocalGenerator(tokenizer, t.max_new_tokens, t.top_p, stop_ids, batch_size)
