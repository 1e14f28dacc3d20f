"""Keys by other names: what other tools call our keys, the keys that moved, and "did you mean".

An unknown key gets the closest valid one as a suggestion. The objectives' settings were flat
``train.*`` keys before each objective got its own section; such an old key (``train.beta``) is
an error that names its new place, computed from the chosen objective (``dpo.beta``).
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel

from tunelab.config.methods import method_specs
from tunelab.config.objectives import objective_specs

ALIASES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.schedule",
    "lr_scheduler": "train.schedule",
    "warmup": "train.warmup_ratio",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "lora_rank": "method.rank",
    "lora_r": "method.rank",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "lora_target_modules": "method.target_modules",
    "finetuning_type": "method.type",
    "model_name_or_path": "model.path",
    "base_model": "model.path",
    "dataset": "data.train",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "sample_packing": "data.packing",
    "output": "output_dir",
}
"""Names other tools use for our keys (matched on the last part of a key), so that "did you mean" finds them."""

MOVED_TO_OBJECTIVE_SECTION: tuple[str, ...] = (
    "beta", "loss_type", "label_smoothing", "rpo_alpha", "gamma", "desirable_weight", "undesirable_weight",
    "precompute_reference", "reward_fn", "reward_weights", "reward_model", "num_generations", "prompts_per_step",
    "max_new_tokens", "temperature", "top_p", "generation_batch_size", "rollout_generator",
    "vllm_gpu_memory_utilization", "kl_coef", "kl_target", "clip_range", "clip_range_high", "update_epochs",
    "minibatches", "discount", "gae_lambda", "value_coef", "value_clip_range", "entropy_coef", "whiten_advantages",
)
"""The former ``train.*`` keys that are now in the section named after the objective (``train.beta`` -> ``dpo.beta``)."""


def section_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a section class (nested sections included), e.g. ``train.lr``."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        if field.exclude:  # the objective's section, keyed by the objective's name instead
            continue
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            keys.extend(section_keys(nested[0], f"{path}."))
    return keys


def all_keys() -> list[str]:
    """Every valid dotted key: the sections', every method's (``method.rank``) and every objective's (``dpo.beta``)."""
    from tunelab.config.root import TunelabConfig

    keys = section_keys(TunelabConfig)
    for spec in dict.fromkeys(method_specs().values()):  # every method's settings, each key once
        keys.extend(key for key in section_keys(spec.settings, "method.") if key not in keys)
    for name, spec in objective_specs().items():
        keys.extend(section_keys(spec.settings, f"{name}."))
    return keys


def moved_key(wrong: str, objective: str) -> str | None:
    """The new key of a former ``train.*`` objective setting: in the chosen objective's section when it has
    that setting, else in the first objective's section that does; None for any other key."""
    section, _, leaf = wrong.rpartition(".")
    if section != "train" or leaf not in MOVED_TO_OBJECTIVE_SECTION:
        return None
    specs = objective_specs()
    owners = [name for name, spec in specs.items() if leaf in spec.settings.model_fields]
    if objective in owners:
        return f"{objective}.{leaf}"
    return f"{owners[0]}.{leaf}" if owners else None


def suggest_key(wrong: str, objective: str = "sft") -> str | None:
    """The valid key closest to a wrong dotted key, or None when nothing is close.

    Args:
        wrong: the unknown key, e.g. ``train.learning_rate`` or ``train.beta``.
        objective: ``train.objective`` of the config (where a former ``train.*`` objective setting went).
    """
    if (moved := moved_key(wrong, objective)) is not None:
        return moved
    valid = all_keys()
    section, _, leaf = wrong.rpartition(".")
    alias = difflib.get_close_matches(leaf, list(ALIASES), n=1, cutoff=0.8)
    if alias:
        return ALIASES[alias[0]]
    specs = objective_specs()
    if section in specs or section == "method":  # a setting of another objective (or method) by its exact name
        elsewhere = [k for k in valid if k.rpartition(".")[2] == leaf and k != wrong and k.partition(".")[0] in specs]
        if elsewhere:
            own = [k for k in elsewhere if k.startswith(f"{objective}.")]
            return (own or elsewhere)[0]
    candidates = [k for k in valid if k.rpartition(".")[0] == section] if section else []
    for pool in (candidates, valid):
        match = difflib.get_close_matches(wrong, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    # A right leaf in the wrong section ("lr" at the top level -> "train.lr").
    by_leaf = [k for k in valid if k.rpartition(".")[2] == leaf]
    if by_leaf:
        own = [k for k in by_leaf if k.startswith(f"{objective}.")]
        return (own or by_leaf)[0]
    leaves = {k.rpartition(".")[2]: k for k in valid}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)
    return leaves[match[0]] if match else None
