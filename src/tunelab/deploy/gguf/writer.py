"""Writing the GGUF file: metadata, then every tensor in llama.cpp's layout and type."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.deploy.gguf.gguf_lib import _gguf
from tunelab.deploy.gguf.archs import arch_of, gguf_hparams
from tunelab.deploy.gguf.hf_checkpoint import _read_config, _Weights, llama3_rope_factors
from tunelab.deploy.gguf.tensors import OUTTYPES, _plan_tensors, _prepared
from tunelab.deploy.gguf.tokenizer import _SPECIAL_ID_KEYS, _read_tokenizer, _Tokenizer
from tunelab.errors import TunelabError
from tunelab.outputs import claim_output, fsync_path, write_errors

F16_MAX = 65504.0


def _convert(data: np.ndarray, qtype: str, name: str) -> np.ndarray:
    gguf = _gguf()
    if not np.isfinite(data).all():
        raise TunelabError(f"tensor {name} holds NaN or infinite values; refusing to export a broken model")
    if qtype == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == "F16":
        peak = float(np.abs(data).max()) if data.size else 0.0
        if peak > F16_MAX:
            raise TunelabError(f"tensor {name} has values up to {peak:g}, beyond float16's range; "
                               "export with --outtype f32 or q8_0")
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)


def export_gguf(model_dir: str | Path, out_file: str | Path, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Write an HF model directory (safetensors) as one GGUF file for llama.cpp.

    Args:
        model_dir: a Hugging Face model directory (``config.json`` whose ``model_type`` is one of
            :data:`~tunelab.deploy.gguf.archs.SUPPORTED_MODEL_TYPES`: llama, mistral, qwen2, qwen3,
            gemma3_text; safetensors weights, a tokenizer). Merge LoRA adapters first (``tunelab merge``).
        out_file: the .gguf file to write (written beside, flushed and renamed into place; parent
            directories are created). An existing file is an error unless ``overwrite``.
        outtype: ``f32``, ``f16`` or ``q8_0`` for the matrices; norms and biases stay f32.
        overwrite: replace an existing ``out_file``.

    Returns:
        The path of the written file.

    Raises:
        TunelabError: the gguf package is missing, an unknown outtype, an unsupported family or
            setting (see :mod:`~tunelab.deploy.gguf.archs`), a quantized model, an adapter directory,
            a tokenizer llama.cpp cannot reproduce, weights that do not fit float16 for ``f16``, or
            NaN/inf weights.
    """
    if outtype not in OUTTYPES:
        raise TunelabError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    gguf = _gguf()
    model_dir, out = Path(model_dir), Path(out_file)
    if out.is_dir():
        raise TunelabError(f"--out {out_file} is a directory; name the .gguf file to write")
    claim_output(out, overwrite, "--out", [("model directory", model_dir)])
    config = _read_config(model_dir)
    arch = arch_of(config)
    hparams = gguf_hparams(config)
    tokenizer = _read_tokenizer(model_dir, hparams["vocab_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with _Weights(model_dir) as weights, write_errors(
            out, "GGUF file", kept=f"{out} is unchanged" if out.exists() else "nothing was written"):
        plan = _plan_tensors(config, weights, outtype)
        writer = gguf.GGUFWriter(path=None, arch=arch.name)
        try:
            _add_metadata(writer, arch.name, model_dir, config, hparams, tokenizer, int(file_type))
            q8_0 = gguf.GGMLQuantizationType.Q8_0
            for p in plan:
                if p.qtype == "Q8_0":
                    byte_shape = gguf.quants.quant_shape_to_byte_shape(p.shape, q8_0)
                    writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                           raw_dtype=q8_0)
                else:
                    dtype = np.dtype(np.float32 if p.qtype == "F32" else np.float16)
                    writer.add_tensor_info(p.name, p.shape, dtype, int(np.prod(p.shape)) * dtype.itemsize)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            factors = llama3_rope_factors(config)
            for p in plan:
                writer.write_tensor_data(_convert(_prepared(p, weights, factors), p.qtype, p.hf_name or p.name))
            writer.close()
            fsync_path(tmp)
            os.replace(tmp, out)
            fsync_path(out.parent)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    return out


def _add_metadata(writer: Any, arch: str, model_dir: Path, config: dict[str, Any], hparams: dict[str, Any],
                  tokenizer: _Tokenizer, file_type: int) -> None:
    gguf = _gguf()
    writer.add_name(str(config.get("_name_or_path") or model_dir.resolve().name))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in hparams.items():
        full_key = f"{arch}.{key}"
        if isinstance(value, str):
            writer.add_string(full_key, value)
        elif isinstance(value, float):
            writer.add_float32(full_key, value)
        else:
            writer.add_uint32(full_key, value)
    writer.add_tokenizer_model(tokenizer.model)
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    if tokenizer.scores is not None:
        writer.add_token_scores(tokenizer.scores)
    if tokenizer.merges:
        writer.add_token_merges(tokenizer.merges)
    for kind, token_id in tokenizer.special_ids.items():
        writer.add_uint32(_SPECIAL_ID_KEYS[kind], token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.add_space_prefix is not None:
        writer.add_add_space_prefix(tokenizer.add_space_prefix)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
