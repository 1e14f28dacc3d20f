"""Loading a model and its tokenizer: device, dtype, precision, attention kernel, safetensors only."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.hub import hub_unavailable, looks_like_hub_id
from tunelab.models.attention import register_packed_sdpa
from tunelab.models.precision import DTYPES, resolve_device
from tunelab.models.quant import quantization_config
from tunelab.models.weight_files import adapter_fit, check_adapter_dir, check_safetensors_dir

def resolve_load_dtype(model_cfg: ModelConfig, frozen_base: bool, device: torch.device) -> torch.dtype:
    """Dtype of the weights as loaded. auto: fp32 where weights train; bf16 for an adapter method's frozen base
    (``frozen_base``: the method's spec does not train the base) on a GPU."""
    if model_cfg.dtype != "auto":
        return DTYPES[model_cfg.dtype]
    if frozen_base and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _check_local(path: str, markers: tuple[str, ...] = ("config.json",)) -> None:
    """A local model directory with one of ``markers``, or a Hub id the Hub (or the local cache) can serve.

    Raises:
        TunelabError: at once, naming the path: a missing local path (never tried on the Hub), a
            directory that is not a model, or a Hub id while the Hub is unreachable or offline mode is
            on and the id is not cached (see :mod:`tunelab.hub`).
    """
    local = Path(path).expanduser()
    if local.exists() or not looks_like_hub_id(path):
        if not local.is_dir():
            raise TunelabError(f"model.path {path}: no such model directory")
        if not any((local / marker).is_file() for marker in markers):
            raise TunelabError(f"model.path {path}: not a Hugging Face model directory (no {markers[0]})")
        return
    problem = hub_unavailable(path, "model.path", markers)
    if problem:
        raise TunelabError(problem)


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a fast tokenizer; add a pad token (EOS) when it has none. Masks never rely on pad.

    ``path`` may be a model directory or an adapter directory that holds a tokenizer.
    """
    _check_local(path, ("tokenizer_config.json", "tokenizer.json", "config.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:  # tokenizers raises a bare Exception for a corrupt tokenizer.json
        raise TunelabError(f"model.path {path}: cannot load the tokenizer: {str(exc).splitlines()[0][:300]}") from None
    if not tokenizer.is_fast:
        raise TunelabError(f"model.path {path}: a fast tokenizer (tokenizer.json) is needed for label masks")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_for(model_cfg: ModelConfig, packing: bool) -> str:
    """The attention implementation to load the model with."""
    if model_cfg.attn_implementation == "auto":
        return register_packed_sdpa(varlen=True) if packing else "sdpa"
    if model_cfg.attn_implementation in ("packed_sdpa", "packed_varlen"):
        return register_packed_sdpa(varlen=model_cfg.attn_implementation == "packed_varlen")
    return model_cfg.attn_implementation


def load_model(
    model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa",
    reward_head: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from safetensors onto a device.

    With ``reward_head`` the model is a sequence classifier with one output (a scalar reward read
    at the last token; a new, randomly initialised ``score`` layer over the same base).

    With ``model_cfg.quantization`` 4bit/8bit the weights are quantized by bitsandbytes while they
    load (see :mod:`tunelab.models.quant`).

    Raises:
        TunelabError: missing directory, no safetensors weights, remote code needed but not allowed,
            quantization without bitsandbytes installed.
    """
    _check_local(model_cfg.path)
    if Path(model_cfg.path).expanduser().is_dir():  # a truncated download fails here, naming the file
        check_safetensors_dir(Path(model_cfg.path).expanduser(), f"model.path {model_cfg.path}")
    quantization = quantization_config(model_cfg, device)
    # A quantized model is placed while it loads (it cannot be moved afterwards).
    if quantization and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
    try:
        head_kwargs = {"num_labels": 1} if reward_head else {}
        model = (AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM).from_pretrained(
            model_cfg.path,
            **head_kwargs,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
            revision=model_cfg.revision,
            use_safetensors=True,
            **placement,
        )
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors' own error is neither
        message = str(exc)
        if "trust_remote_code" in message:
            raise TunelabError(
                f"model.path {model_cfg.path}: the model needs its own Python code; "
                "set model.trust_remote_code: true only if you trust its source"
            ) from None
        if "safetensors" in message or "model.safetensors" in message:
            raise TunelabError(
                f"model.path {model_cfg.path}: no safetensors weights found; tunelab never loads pickled "
                "weights (.bin/.pt). Convert them to safetensors first."
            ) from None
        raise TunelabError(f"model.path {model_cfg.path}: cannot load the model: {message}") from None
    return model if quantization else model.to(device)


def generation_stop_ids(generation: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end an assistant turn at inference: EOS and the generation config's EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = generation.eos_token_id if generation is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    return ids


def add_stop_ids(generation: GenerationConfig, stop_ids: set[int]) -> None:
    """Extend ``generation.eos_token_id`` with the stop ids it lacks (its own ids stay first)."""
    eos = generation.eos_token_id
    known = [eos] if isinstance(eos, int) else list(eos or [])
    generation.eos_token_id = known + sorted(stop_ids - set(known))


def stop_token_ids(model_path: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False) -> set[int]:
    """:func:`generation_stop_ids` read from a model directory, without loading its weights."""
    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation = GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        )
    return generation_stop_ids(generation, tokenizer)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a directory holds a PEFT adapter (adapter_config.json) rather than a whole model."""
    return (Path(path) / "adapter_config.json").is_file()


def load_for_inference(
    model_path: str, adapter: str | None = None, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model ready for evaluation: an HF model directory, or a base plus a PEFT adapter.

    ``model_path`` may itself be an adapter directory (its base comes from adapter_config.json).
    The tokenizer (with the chat template training saved) is taken from the adapter directory
    when it has one, else from the base.

    Raises:
        TunelabError: missing directories, pickled adapter weights, or a model that cannot load.
    """
    from peft import PeftConfig, PeftModel

    if adapter is None and is_adapter_dir(model_path):
        check_adapter_dir(model_path, f"adapter {model_path}")
        adapter, model_path = model_path, PeftConfig.from_pretrained(model_path).base_model_name_or_path
    if adapter is not None:  # before the base loads: a pickled or broken adapter fails at once
        check_adapter_dir(adapter, f"adapter {adapter}")
    device = device or resolve_device("auto")
    model = load_model(ModelConfig(path=model_path, trust_remote_code=trust_remote_code), dtype, device)
    tokenizer_dir = model_path
    if adapter is not None:
        adapter_dir = Path(adapter)
        with adapter_fit(adapter_dir, model_path, f"adapter {adapter}"):
            model = PeftModel.from_pretrained(model, adapter_dir).to(device)
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer_dir = str(adapter_dir)
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    if adapter is not None:
        add_adapter_stop_ids(model, adapter, tokenizer)
    return model.eval(), tokenizer


def add_adapter_stop_ids(model: PreTrainedModel, adapter_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Stop generation also where training stopped: the stop ids tunelab saved with the adapter.

    Training saves its stop ids (e.g. the chat template's end-of-turn token, which a base model's
    own generation config may lack) in the adapter's ``generation_config.json``; ``tunelab merge``
    adds them to the merged model, so the adapter must stop at them too.
    """
    path = Path(adapter_dir) / "generation_config.json"
    if path.is_file() and model.can_generate():
        add_stop_ids(model.generation_config, generation_stop_ids(GenerationConfig.from_pretrained(adapter_dir),
                                                                  tokenizer))


def load_with_adapters(
    model_path: str, adapters: dict[str, str], device: torch.device, dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A base model with several named LoRA adapters (for serving), and the tokenizer to use.

    The tokenizer (and its chat template) comes from the base when it has a chat template,
    else from the first adapter directory that holds one.
    """
    from peft import PeftModel

    for name, directory in adapters.items():  # before the base loads: a pickled or broken adapter fails at once
        check_adapter_dir(directory, f"--adapter {name}={directory}")
    model, tokenizer = load_for_inference(model_path, None, device, dtype, trust_remote_code)
    for index, (name, directory) in enumerate(adapters.items()):
        with adapter_fit(directory, model_path, f"--adapter {name}={directory}"):
            if index == 0:
                model = PeftModel.from_pretrained(model, directory, adapter_name=name)
            else:
                model.load_adapter(directory, adapter_name=name)
        add_adapter_stop_ids(model, directory, tokenizer)  # one stop set for all: the union of the adapters'
        if not tokenizer.chat_template and (Path(directory) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(directory, trust_remote_code)
    return model.to(device).eval(), tokenizer
