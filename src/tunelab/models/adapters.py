"""Which parameters train: full fine-tuning, freezing all but chosen layers, LoRA/QLoRA (with PiSSA
initialisation), or prefix/prompt tuning, all but the first two through PEFT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import PreTrainedModel

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError
from tunelab.models.quant import is_quantized, logical_numel, prepare_kbit_model

DEFAULT_FREEZE_LAYERS = 2  # freeze without trainable_layers trains the last two decoder layers


@dataclass
class ParameterCount:
    """Trainable and total parameter counts."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.2f}%)"


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Count trainable and total parameters (a 4-bit weight counts its unquantized elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return ParameterCount(trainable, total)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise TunelabError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def layer_indices(spec: list[int] | int | str, count: int) -> list[int]:
    """Resolve ``method.trainable_layers`` against a model with ``count`` decoder layers.

    Args:
        spec: a list of indices (negative counts from the end), an int N (the last N layers), or a
            slice ``"start:stop"`` in Python's notation (``"-8:"``, ``":4"``, ``"2:6"``).
        count: the number of decoder layers.

    Returns:
        Sorted, distinct layer indices.

    Raises:
        TunelabError: an index out of range, N outside 1..count, or a slice that selects nothing.
    """
    if isinstance(spec, str):
        start, _, stop = spec.partition(":")
        indices = list(range(count))[slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)]
        if not indices:
            raise TunelabError(f"method.trainable_layers '{spec}' selects no layer; the model has {count} (0..{count - 1})")
        return indices
    if isinstance(spec, int):
        if not 0 < spec <= count:
            raise TunelabError(f"method.trainable_layers {spec}: the model has {count} layers; use 1..{count}")
        return list(range(count - spec, count))
    bad = [i for i in spec if not -count <= i < count]
    if bad or not spec:
        raise TunelabError(f"method.trainable_layers {spec}: the model has {count} layers (0..{count - 1})")
    return sorted({i % count for i in spec})


def _set_embeddings_trainable(model: PreTrainedModel, trainable: bool) -> None:
    model.get_input_embeddings().requires_grad_(trainable)
    output = model.get_output_embeddings()  # None for a sequence-classification model
    if output is not None:
        output.requires_grad_(trainable)


def apply_freeze(model: PreTrainedModel, method: MethodConfig) -> list[int]:
    """Freeze everything but the chosen decoder layers (and, optionally, embeddings and head).

    Returns:
        The indices of the layers that train.
    """
    layers = decoder_layers(model)
    spec = method.trainable_layers if method.trainable_layers is not None else DEFAULT_FREEZE_LAYERS
    chosen = layer_indices(spec, len(layers))
    model.requires_grad_(False)
    for index in chosen:
        for name, parameter in layers[index].named_parameters():
            if not method.trainable_modules or any(part in name for part in method.trainable_modules):
                parameter.requires_grad_(True)
    if method.train_embeddings:
        _set_embeddings_trainable(model, True)
    if count_parameters(model).trainable == 0:
        raise TunelabError(f"method.trainable_modules {method.trainable_modules} matches no parameter in layers {chosen}")
    return chosen


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Names (last component) of the linear layers inside the decoder layers: what all-linear means."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in decoder_layers(model).named_modules()
        if isinstance(module, torch.nn.Linear)  # bitsandbytes' 4/8-bit linears subclass it
    }
    return sorted(names)


def lora_config(method: MethodConfig, task_type: str = "CAUSAL_LM", model: PreTrainedModel | None = None) -> LoraConfig:
    """The PEFT LoRA config for a method section (``SEQ_CLS`` for a reward model: its head trains too).

    With ``method.trainable_layers`` only those decoder layers get LoRA; ``model`` is then needed
    to resolve them (and ``all-linear``, which PEFT does not combine with a layer choice).
    """
    target_modules = method.target_modules
    layers = None
    if method.trainable_layers is not None:
        if model is None:
            raise ValueError("lora_config: method.trainable_layers needs the model to resolve the layers")
        layers = layer_indices(method.trainable_layers, len(decoder_layers(model)))
        if target_modules == "all-linear":
            target_modules = linear_module_names(model)
    init: bool | str = {"default": True, "gaussian": "gaussian"}.get(method.init, "pissa")
    if method.init == "pissa" and method.pissa_niter is not None:
        init = f"pissa_niter_{method.pissa_niter}"
    return LoraConfig(
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        init_lora_weights=init,
        modules_to_save=method.modules_to_save or None,  # SEQ_CLS: PEFT adds the score head itself
        task_type=task_type,
    )


def prompt_learning_config(method: MethodConfig, task_type: str, model: PreTrainedModel) -> PeftConfig:
    """The PEFT config for prefix tuning or prompt tuning.

    Prompt tuning's text initialisation tokenizes ``method.prompt_init_text`` with the tokenizer
    in the model's directory.
    """
    if method.type == "prefix":
        return PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=method.num_virtual_tokens, prefix_projection=method.prefix_projection
        )
    init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}[method.prompt_init]
    text = {"prompt_tuning_init_text": method.prompt_init_text, "tokenizer_name_or_path": model.name_or_path}
    return PromptTuningConfig(
        task_type=task_type, num_virtual_tokens=method.num_virtual_tokens, prompt_tuning_init=init,
        **(text if init == "TEXT" else {}),
    )


def packing_conflict(method: MethodConfig) -> str | None:
    """Why ``method`` cannot train on padding-free packed rows, or None when it can.

    Prefix and prompt tuning prepend virtual tokens once per row, so in a packed row only the
    first sequence would see them at the right place (and prompt tuning discards position ids).
    """
    if method.uses_virtual_tokens:
        return f"method.type {method.type} prepends virtual tokens to each row, which needs one sequence per row"
    return None


def apply_method(model: PreTrainedModel, method: MethodConfig, task_type: str = "CAUSAL_LM") -> PreTrainedModel | PeftModel:
    """Set up the parameters that train for ``method.type``.

    full: every weight (the embeddings and head stay frozen with ``train_embeddings: false``);
    freeze: chosen layers; lora/qlora: LoRA adapters (a quantized base is first prepared for k-bit
    training); prefix/prompt: virtual tokens.

    Raises:
        TunelabError: a layer index or target module that does not exist, or an option PEFT rejects.
    """
    if method.type == "full":
        model.requires_grad_(True)
        if method.train_embeddings is False:
            _set_embeddings_trainable(model, False)
        return model
    if method.type == "freeze":
        apply_freeze(model, method)
        return model
    if is_quantized(model):
        model = prepare_kbit_model(model)
    if method.uses_virtual_tokens:
        try:
            return get_peft_model(model, prompt_learning_config(method, task_type, model))
        except (ValueError, OSError) as exc:
            raise TunelabError(f"method.type {method.type}: {exc}") from None
    try:
        return get_peft_model(model, lora_config(method, task_type, model))
    except ValueError as exc:
        raise TunelabError(f"method (LoRA, target_modules {method.target_modules}): {exc}") from None


def enable_gradient_checkpointing(model: PreTrainedModel | PeftModel, fraction: float = 1.0) -> tuple[int, int]:
    """Recompute activations in backward (non-reentrant, so frozen inputs need no grad hooks).

    ``fraction`` < 1 checkpoints only that share of the decoder layers, spread evenly (selective
    checkpointing: the others keep their activations, trading memory for less recomputation).
    Returns (checkpointed layers, decoder layers).
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    try:
        layers = decoder_layers(base)
    except TunelabError:  # no recognisable layer stack: the model's own checkpointing, all or nothing
        return 0, 0
    keep = max(1, round(fraction * len(layers)))
    chosen = {i * len(layers) // keep for i in range(keep)}
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
    return len(chosen), len(layers)


def save_initial_adapter(model: PeftModel, directory: Path) -> None:
    """Save a PiSSA adapter as initialised, before any training step.

    PiSSA moves the principal part of each weight into the adapter. With this initial state,
    :func:`save_pissa_as_lora` can later express the trained adapter as an ordinary LoRA for the
    original, unmodified base. The saved config says ``init_lora_weights: true`` (as PEFT requires
    for the conversion); the model's own config keeps ``pissa``.
    """
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def save_pissa_as_lora(model: PeftModel, directory: Path, initial_dir: Path) -> None:
    """Save a trained PiSSA adapter as an ordinary LoRA (rank 2r) for the original base.

    ``W_res + A B = W + (A B - A0 B0)``, so ``[A | A0]`` and ``[B | -B0]`` form a LoRA of the
    unmodified weights (PEFT's ``path_initial_model_for_weight_conversion``). It loads with plain
    PEFT on the base model and merges like any LoRA.
    """
    model.save_pretrained(str(directory), safe_serialization=True,
                          path_initial_model_for_weight_conversion=str(initial_dir))


PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"


def prompt_encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full trainable state of a prefix-tuning projection, or None for every other model.

    With ``prefix_projection`` PEFT saves only the projection's output (what inference needs); a
    checkpoint that training resumes from also needs the embedding and MLP that produce it.
    """
    config = model.active_peft_config if isinstance(model, PeftModel) else None
    if not isinstance(config, PrefixTuningConfig) or not config.prefix_projection:
        return None
    return {name: tensor.detach().contiguous() for name, tensor in model.prompt_encoder["default"].state_dict().items()}


def load_prompt_encoder_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`prompt_encoder_state` returned."""
    model.prompt_encoder["default"].load_state_dict(state, strict=True)


def has_virtual_tokens(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT prefix/prompt-tuning model (one sequence per row; no packing)."""
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning
