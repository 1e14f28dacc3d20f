"""Checking a written GGUF file against the HF directory: metadata, every tensor within its type's error, tokenizer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.deploy.gguf.gguf_lib import _gguf
from tunelab.deploy.gguf.archs import arch_of, export_notes, gguf_hparams
from tunelab.deploy.gguf.hf_checkpoint import _read_config, _Weights, llama3_rope_factors
from tunelab.deploy.gguf.reader import read_gguf
from tunelab.deploy.gguf.tensors import Q8_0_BLOCK, _plan_tensors, unpermute_qk
from tunelab.deploy.gguf.verify_tokenizer import _verify_tokenizer
from tunelab.errors import TunelabError


def _error_bound(reference: np.ndarray, qtype: str) -> np.ndarray:
    """The largest error each value may have after rounding to ``qtype`` and back.

    f16: half a unit in the last place (relative 2^-11; 2^-25 absolute for subnormals). q8_0: per
    block of 32, half a step of ``d = amax/127`` plus the f16 rounding of ``d`` times up to 127 steps.
    """
    if qtype == "F32":
        return np.zeros_like(reference)
    if qtype == "F16":
        return np.abs(reference) * 2.0**-11 + 2.0**-25
    blocks = reference.reshape(-1, Q8_0_BLOCK)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    bound = amax / 127 * (0.5 + 127 * 2.0**-11 + 1e-3) + 127 * 2.0**-25
    return np.broadcast_to(bound, blocks.shape).reshape(reference.shape)


def verify_gguf(model_dir: str | Path, gguf_file: str | Path, check_tokenization: bool = True) -> dict[str, Any]:
    """Read a GGUF file back and check it against the HF model directory it was exported from.

    Every tensor is dequantized (``gguf.quants``), un-permuted (Q/K) and compared with the HF
    weight: equal for f32, within f16 rounding for f16, within q8_0's per-block error for q8_0.
    The metadata must match config.json; the vocabulary (tokens, types, merges or scores),
    special ids, add-BOS/EOS flags and chat template must match the HF tokenizer; and for
    byte-level BPE the texts in ``_TOKENIZER_PROBES`` (plus a rendered chat) must tokenize to the
    HF ids with llama.cpp's algorithm and the file's pre-tokenizer preset.

    Returns:
        A summary: file size, tensor counts per type, max absolute error per type, q8_0
        fallbacks, the tokenizer facts that were checked, and notes on what the file says
        differently from config.json (:func:`~tunelab.deploy.gguf.archs.export_notes`).

    Raises:
        TunelabError: listing every mismatch found.
    """
    gguf = _gguf()
    model_dir, gguf_file = Path(model_dir), Path(gguf_file)
    config = _read_config(model_dir)
    arch = arch_of(config).name
    hparams = gguf_hparams(config)
    info = read_gguf(gguf_file)
    meta = info["metadata"]
    problems: list[str] = []
    if meta.get("general.architecture") != arch:
        problems.append(f"general.architecture is {meta.get('general.architecture')!r}, expected {arch!r}")
    for key, expected in hparams.items():
        actual = meta.get(f"{arch}.{key}")
        if isinstance(expected, float):
            ok = actual is not None and math.isclose(actual, expected, rel_tol=1e-6)
        else:
            ok = actual == expected
        if not ok:
            problems.append(f"{arch}.{key} is {actual!r}, config.json gives {expected!r}")
    file_type = meta.get("general.file_type")
    outtype = {0: "f32", 1: "f16", 7: "q8_0"}.get(file_type)
    if outtype is None:
        problems.append(f"general.file_type {file_type!r} is not one tunelab writes")
        outtype = "f32"

    reader = gguf.GGUFReader(str(gguf_file))
    stored = {t.name: t for t in reader.tensors}
    max_err: dict[str, float] = {}
    counts: dict[str, int] = {}
    fallbacks: list[str] = []
    with _Weights(model_dir) as weights:
        plan = _plan_tensors(config, weights, outtype)
        expected_names = {p.name for p in plan}
        for name in sorted(set(stored) - expected_names):
            problems.append(f"tensor {name} is in the file but not expected")
        factors = llama3_rope_factors(config)
        for p in plan:
            tensor = stored.get(p.name)
            if tensor is None:
                problems.append(f"tensor {p.name} ({p.hf_name}) is missing")
                continue
            qtype = tensor.tensor_type.name
            counts[qtype] = counts.get(qtype, 0) + 1
            if qtype != p.qtype:
                problems.append(f"{p.name} is {qtype}, expected {p.qtype}")
                continue
            if p.fallback:
                fallbacks.append(f"{p.name}: {p.fallback}; kept F16")
            shape = [int(d) for d in reversed(tensor.shape.tolist())]
            if shape != list(p.shape):
                problems.append(f"{p.name} has shape {shape}, HF {p.hf_name} has {list(p.shape)}")
                continue
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(p.shape).astype(np.float32)
            if p.permute_heads:
                values = unpermute_qk(values, p.permute_heads)
            reference = factors if p.hf_name is None else weights.get(p.hf_name)
            # Gemma's norms are stored plus the shift: compare with it removed, within the rounding of the stored value.
            error = np.abs(values.astype(np.float64) - p.shift - reference.astype(np.float64))
            worst = float(error.max()) if error.size else 0.0
            max_err[qtype] = max(max_err.get(qtype, 0.0), worst)
            stored_value = reference.astype(np.float64) + p.shift
            bound = _error_bound(stored_value, qtype) + (np.abs(stored_value) * 2.0**-24 if p.shift else 0.0)
            excess = error - bound  # the shift itself was added in float32: half an f32 ulp more
            if not np.all(excess <= 0):
                at = np.unravel_index(int(np.argmax(excess)), excess.shape)
                shifted = f" (stored plus {p.shift:g})" if p.shift else ""
                problems.append(f"{p.name} differs from {p.hf_name or 'the computed rope factors'}{shifted} beyond "
                                f"{qtype} rounding: {values[at]!r} vs {reference[at]!r} at {tuple(int(i) for i in at)}")

    tokenizer_summary = _verify_tokenizer(model_dir, meta, hparams["vocab_size"], problems, check_tokenization)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise TunelabError(f"{gguf_file} does not match {model_dir}:\n  {shown}")
    return {
        "file": str(gguf_file),
        "file_size": info["file_size"],
        "outtype": outtype,
        "n_tensors": len(stored),
        "tensor_types": counts,
        "max_abs_error": max_err,
        "q8_0_fallbacks": fallbacks,
        "tokenizer": tokenizer_summary,
        "notes": export_notes(config),
    }
