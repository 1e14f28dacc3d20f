"""The rules that span sections: combinations that would fail deep inside a run, or train something else.

Every rule is a function over the whole, already section-validated config that returns an error
message or None; :func:`config_errors` runs them all. No rule changes the config, and a value that
depends on another section (the base's quantization under ``model.quantization: auto``) is computed
by a function here (:func:`base_quantization`), where it is used, never written back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from tunelab.config.methods import method_spec
from tunelab.config.objectives import objective_spec, objective_specs

TunelabConfig = Any
"""A :class:`tunelab.config.root.TunelabConfig` (not imported: root runs these rules, so this module sits below it)."""

Rule = Callable[[TunelabConfig], "str | None"]


def base_quantization(config: TunelabConfig) -> Literal["none", "4bit", "8bit"]:
    """The quantization the base is loaded with: ``model.quantization``, where ``auto`` is 4bit for a method
    that trains on a quantized base (qlora) and none otherwise."""
    if config.model.quantization == "auto":
        return "4bit" if config.method.needs_quantized_base else "none"
    return config.model.quantization


def _prompt_learning(config: TunelabConfig) -> bool:
    return bool(method_spec(config.method.type).prompt_learning)


def _sharded(config: TunelabConfig) -> bool:
    strategy = config.distributed.strategy
    return strategy == "fsdp" or (strategy == "deepspeed" and config.distributed.deepspeed.zero_stage == 3)


def online_rl_without_deepspeed(config: TunelabConfig) -> str | None:
    """Online RL runs with strategy none, ddp or fsdp (its update is split by the engine, not DeepSpeed)."""
    if config.distributed.strategy == "deepspeed" and objective_spec(config.train.objective).online:
        return (f"train.objective {config.train.objective} (online RL) runs with distributed.strategy none, "
                "ddp or fsdp")
    return None


def vllm_rollouts_without_fsdp(config: TunelabConfig) -> str | None:
    """vLLM holds the whole policy in each process, which FSDP's shards cannot feed."""
    name = config.train.objective
    if getattr(config.objective_settings, "rollout_generator", None) == "vllm" and config.distributed.strategy == "fsdp":
        return (f"{name}.rollout_generator vllm loads the whole policy into each process's engine; use "
                f"distributed.strategy ddp or none with it (or {name}.rollout_generator batched with fsdp)")
    return None


def fp16_not_sharded(config: TunelabConfig) -> str | None:
    """fp16 needs a loss scaler synchronised across shards, which the sharded strategies do not get."""
    strategy = config.distributed.strategy
    if strategy in ("fsdp", "deepspeed") and config.train.precision == "fp16":
        return (f"train.precision fp16 with distributed.strategy {strategy}: use bf16 (fp16 needs a loss scaler "
                "synchronised across shards)")
    return None


def quantized_base_not_sharded(config: TunelabConfig) -> str | None:
    """A 4/8-bit base cannot be sharded; each ddp process holds the small quantized base instead."""
    strategy = config.distributed.strategy
    if strategy in ("fsdp", "deepspeed") and base_quantization(config) != "none":
        return (f"a quantized base (method qlora, model.quantization) cannot be sharded by distributed.strategy "
                f"{strategy}; use strategy ddp (each process holds the small 4-bit base)")
    return None


def virtual_tokens_without_zero3(config: TunelabConfig) -> str | None:
    """PEFT computes the saved virtual tokens in one process, which ZeRO-3's partitioned encoder cannot do."""
    deepspeed = config.distributed.deepspeed
    if config.distributed.strategy == "deepspeed" and deepspeed.zero_stage == 3 and _prompt_learning(config):
        return (f"method.type {config.method.type} with DeepSpeed ZeRO-3: PEFT computes the saved virtual tokens in "
                "one process, which ZeRO-3's partitioned encoder cannot do; use strategy fsdp, ddp, or deepspeed "
                "zero_stage 1 or 2")
    return None


def pissa_not_sharded(config: TunelabConfig) -> str | None:
    """PiSSA converts the trained adapter with the whole weights in one process."""
    if config.distributed.strategy != "none" and _sharded(config) and config.method.uses_pissa:
        return ("method.init pissa converts the trained adapter with the whole weights in one process; use "
                "distributed.strategy ddp or deepspeed with zero_stage 1 or 2")
    return None


def pissa_not_the_reference(config: TunelabConfig) -> str | None:
    """With PiSSA, switching the adapters off does not give the base model back."""
    spec, settings = objective_spec(config.train.objective), config.objective_settings
    if config.method.uses_pissa and spec.uses_reference(settings) and not spec.reference_precomputed(settings):
        name = config.train.objective
        instead = (f"{name}.precompute_reference: true" if "precompute_reference" in type(settings).model_fields
                   else f"{name}.kl_coef: 0 (no KL term)")
        return (f"method.init pissa with train.objective {name}: switching the adapters off does not give the base "
                f"model back, so it cannot be the reference; use {instead} or the default LoRA init")
    return None


def online_rl_without_grad_accum(config: TunelabConfig) -> str | None:
    """An online optimizer step takes one minibatch of the step's rollouts, not accumulated micro-batches."""
    name = config.train.objective
    if objective_spec(name).online and config.train.grad_accum != 1:
        return (f"train.grad_accum does not apply to train.objective {name} (online RL): an optimizer step takes "
                f"one minibatch of the step's rollouts ({name}.minibatches), run {name}.generation_batch_size rows "
                "at a time")
    return None


def rows_fit_the_token_budget(config: TunelabConfig) -> str | None:
    """When packing, a row must hold the longest sequence (a pair: both of its sequences)."""
    per_row = objective_spec(config.train.objective).rows_per_example  # 0: rollouts, batched by rows
    budget, length = config.train.batch_tokens, config.data.max_length
    if config.data.packing and budget < per_row * length:
        what = "twice data.max_length" if per_row == 2 else "data.max_length"
        return (f"train.batch_tokens ({budget}) must be at least {what} ({per_row * length}) when packing, so "
                f"that every {'pair' if per_row == 2 else 'sequence'} fits in a row")
    return None


def qlora_needs_a_quantized_base(config: TunelabConfig) -> str | None:
    """QLoRA is LoRA on a quantized base."""
    if config.method.needs_quantized_base and base_quantization(config) == "none":
        return f"method.type {config.method.type} needs a quantized base: model.quantization 4bit or 8bit (or use lora)"
    return None


def pissa_needs_full_precision(config: TunelabConfig) -> str | None:
    """PiSSA's residual weights would be quantized, and its adapter would not fit the full-precision base."""
    if base_quantization(config) != "none" and config.method.uses_pissa:
        return ("method.init pissa with a quantized base would quantize the residual weights, and the saved adapter "
                "would not fit the full-precision base; use pissa with method.type lora, or qlora with init default")
    return None


def quantized_weights_do_not_train(config: TunelabConfig) -> str | None:
    """Quantized weights cannot be trained themselves: only adapter methods work on a quantized base."""
    quantization = base_quantization(config)
    if quantization != "none" and method_spec(config.method.type).trains_base:
        return (f"model.quantization {quantization}: quantized weights cannot be trained by method "
                f"{config.method.type}; use qlora, lora, prefix or prompt, or model.quantization none")
    return None


def token_level_features(config: TunelabConfig) -> str | None:
    """Prompt/prefix tuning and NEFTune apply to next-token objectives over whole sequences only."""
    if objective_spec(config.train.objective).token_level:
        return None
    token_level = " or ".join(name for name, spec in objective_specs().items() if spec.token_level)
    if _prompt_learning(config):
        return f"method.type {config.method.type} trains with train.objective {token_level} only"
    if config.train.neftune_alpha is not None:
        return f"train.neftune_alpha (NEFTune) applies to train.objective {token_level} only"
    return None


RULES: tuple[Rule, ...] = (
    online_rl_without_deepspeed, vllm_rollouts_without_fsdp, fp16_not_sharded, quantized_base_not_sharded,
    virtual_tokens_without_zero3, pissa_not_sharded, pissa_not_the_reference, online_rl_without_grad_accum,
    rows_fit_the_token_budget, qlora_needs_a_quantized_base, pissa_needs_full_precision,
    quantized_weights_do_not_train, token_level_features,
)
"""Every cross-section rule, in the order their messages are reported."""


def config_errors(config: TunelabConfig) -> list[str]:
    """The messages of every rule the config breaks (empty: it is consistent)."""
    spec = objective_spec(config.train.objective)
    if not isinstance(config.objective_settings, spec.settings):
        return []  # its section failed validation (reported on its own); the rules need it
    return [message for rule in RULES if (message := rule(config)) is not None]
