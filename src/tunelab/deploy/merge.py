"""``tunelab merge``: fold a LoRA adapter into its base and save a plain HF model directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import GenerationConfig

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.models.precision import DTYPES
from tunelab.models.load import add_stop_ids, generation_stop_ids, is_adapter_dir, load_model, load_tokenizer
from tunelab.models.weight_files import adapter_fit, check_adapter_dir
from tunelab.outputs import atomic_output, claim_output
from tunelab.track.record import Artifact, record_run


def quantization_of(model_dir: str | Path) -> str | None:
    """The quantization method recorded in a model's config.json (e.g. bitsandbytes 4-bit), or None."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    quantization = json.loads(config.read_text()).get("quantization_config")
    if not quantization:
        return None
    bits = "4-bit" if quantization.get("load_in_4bit") else "8-bit" if quantization.get("load_in_8bit") else ""
    return f"{quantization.get('quant_method', 'quantized')} {bits}".strip()


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                  base: str | None = None, overwrite: bool = False) -> Path:
    """Merge a PEFT LoRA adapter into its base model and save the result.

    The merge is done in float32 and the merged weights are then cast to ``dtype``. The output
    holds safetensors weights, the adapter's tokenizer and chat template, a generation config
    whose EOS ids include every stop token training used, and ``run.json`` (the merge is
    registered as a run whose parent is the training run that wrote the adapter).

    Args:
        adapter_dir: a PEFT adapter directory (tunelab's ``final/``).
        out_dir: where to write the merged model.
        dtype: float32, bfloat16 or float16.
        base: the base model directory (default: the adapter's ``base_model_name_or_path``).
        overwrite: replace an existing ``out_dir`` (otherwise an existing one is an error).

    Raises:
        TunelabError: not an adapter (or pickled adapter weights), ``out_dir`` exists or holds the
            adapter or the base, a quantized base (dequantise first), an adapter that does not fit
            the base, an unknown dtype.
    """
    if not Path(adapter_dir).is_dir() or not is_adapter_dir(adapter_dir):
        check_adapter_dir(adapter_dir, f"--adapter {adapter_dir}")  # says what is missing
    if dtype not in DTYPES:
        raise TunelabError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if base is None:
        try:
            base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
        except (OSError, ValueError, TypeError) as exc:
            raise TunelabError(f"--adapter {adapter_dir}: adapter_config.json cannot be read ({exc})") from None
        if not base:
            raise TunelabError(f"--adapter {adapter_dir}: adapter_config.json names no base model; pass --base")
    quantized = quantization_of(base)
    if quantized:
        raise TunelabError(
            f"base {base} is {quantized}: merging LoRA weights into quantized weights would round them away "
            "and save a model that is neither. Dequantise first: load the base in bfloat16/float16 (the "
            "unquantized checkpoint), then run tunelab merge --base on that directory."
        )
    check_adapter_dir(adapter_dir, f"--adapter {adapter_dir}")  # safetensors weights, never a pickle
    out = claim_output(out_dir, overwrite, "--out", [("adapter", adapter_dir), ("base model", base)])
    model = load_model(ModelConfig(path=base), torch.float32, torch.device("cpu"))
    with adapter_fit(adapter_dir, base, f"--adapter {adapter_dir}"):
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    adapter_path = Path(adapter_dir)
    tokenizer = load_tokenizer(str(adapter_path if (adapter_path / "tokenizer_config.json").is_file() else base))
    stops = generation_stop_ids(merged.generation_config, tokenizer)
    if (adapter_path / "generation_config.json").is_file():  # tunelab saves the training stop ids there
        stops |= generation_stop_ids(GenerationConfig.from_pretrained(adapter_path), tokenizer)
    add_stop_ids(merged.generation_config, stops)
    merged.config.use_cache = True
    with atomic_output(out, what="merged model") as tmp:  # written beside, flushed, then renamed into place
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    record_run("merge", out / "run.json", inputs=[Artifact("adapter", str(adapter_dir)), Artifact("model", base)],
               outputs=[Artifact("model", str(out))], details={"base_model": base, "dtype": dtype},
               config={"adapter": str(adapter_dir), "base": base, "dtype": dtype, "out": str(out)})
    return out
