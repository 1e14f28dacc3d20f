"""``tunelab export``: a model to ONNX or GGUF, verified, recorded, and optionally through the parity gate.

The export is written first (``wrote PATH``), then checked (ONNX: logits and greedy generations
against transformers with onnxruntime; GGUF: read back tensor by tensor, tokenizer and chat
template compared), recorded in the run registry, and with parity options compared with the
model it came from on real prompts.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.deploy.parity.verify import GateOptions


def export_model(
    fmt: str, model: str, out: str, *, outtype: str = "f16", dtype: str | None = None, past: bool = True,
    verify: bool = True, overwrite: bool = False, parity: GateOptions | None = None,
) -> bool:
    """Export ``model`` as ``fmt`` (``onnx`` or ``gguf``) to ``out``, printing each step's result.

    Args:
        outtype: GGUF weight type (f32, f16, q8_0).
        dtype: ONNX weight dtype (float32, float16; None: float32).
        past: ONNX with KV-cache inputs and outputs.
        verify: check the export (onnxruntime parity, or the GGUF read back).
        parity: run the parity gate of the export against ``model`` (its report is claimed before the export).

    Returns:
        False when the parity gate failed, else True.
    """
    from tunelab.progress import progress_bar
    from tunelab.track.record import record_export

    if parity is not None:  # the parity report is claimed before the export is written
        from tunelab.deploy.parity.verify import claim_report

        claim_report(parity, [model, out])
    if fmt == "onnx":
        from tunelab.deploy.onnx import export_onnx, verify_onnx

        with progress_bar(f"exporting {model} to ONNX"):
            written = export_onnx(model, out, with_past=past, dtype=dtype or "float32", overwrite=overwrite)
        print(f"wrote {written}")
        checks = None
        if verify:
            atol = 1e-4 if (dtype or "float32") == "float32" else 1e-2
            with progress_bar("verifying with onnxruntime (logits and greedy generations)"):
                checks = verify_onnx(model, written, atol=atol)
            print(f"verified with onnxruntime: max |logit difference| {checks['max_abs_diff']:.2e}, "
                  f"greedy generations equal: {checks['generations_equal']}")
        record_export(model, written, {"format": "onnx", "dtype": dtype or "float32", "past": past}, checks)
    else:
        from tunelab.deploy.gguf import export_gguf, verify_gguf

        with progress_bar(f"exporting {model} to GGUF ({outtype})"):
            written = export_gguf(model, out, outtype, overwrite=overwrite)
        print(f"wrote {written}")
        checks = None
        if verify:
            with progress_bar("verifying the GGUF file by reading it back"):
                checks = verify_gguf(model, written)
            errors = ", ".join(f"{kind} {error:.2e}" for kind, error in checks["max_abs_error"].items())
            print(f"verified by reading it back: {checks['n_tensors']} tensors (max |error| {errors}); "
                  "tokenizer and chat template match")
            for note in checks["notes"]:
                print(f"note: {note}")
        record_export(model, written, {"format": "gguf", "outtype": outtype}, checks)
    if parity is None:
        return True
    from tunelab.deploy.parity.verify import verify_export

    return verify_export(model, fmt, Path(written), parity)
