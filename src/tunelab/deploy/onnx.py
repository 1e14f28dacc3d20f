"""ONNX export of a causal LM, a greedy ONNX Runtime generator, and a parity check against transformers.

The exported graph is a decoder **with past key/values** (the default), so generation feeds one
new token per step instead of the whole sequence:

- inputs: ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, total_seq] int64 (past +
  new tokens, 0 on left padding), ``position_ids`` [batch, seq] int64, and per layer N
  ``past_key_values.N.key`` / ``past_key_values.N.value`` [batch, kv_heads, past_seq, head_dim];
- outputs: ``logits`` [batch, seq, vocab] and ``present.N.key`` / ``present.N.value``
  [batch, kv_heads, past_seq + seq, head_dim] (the past with the new tokens appended).

The first step (prefill) passes past tensors of length 0. ``with_past=False`` exports the plain
variant instead (``input_ids``, ``attention_mask``, ``position_ids`` -> ``logits``; the whole
sequence is re-run each step): simpler to serve, much slower to generate from.

How: ``torch.onnx.export(dynamo=True)`` on a small wrapper module whose forward takes the cache
as flat tensors, builds a transformers ``DynamicCache`` from them and returns the updated cache
flat again. transformers 5's Cache objects therefore never cross the export boundary, and the
graph is the model's own code (SDPA attention, the transformers mask builder, RoPE from
``position_ids``). The TorchScript exporter was not needed. optimum's exporter does not install
with transformers 5 (docs/deploy-onnx.md).

Only caches made of full-attention layers export with past (Llama, Mistral without a sliding
window, Qwen2, ...); models with sliding-window or other cache layers are refused with past and
can be exported with ``with_past=False``.

The output directory is self-contained for serving: ``model.onnx`` (+ ``model.onnx.data`` when the
weights are large), the tokenizer files and chat template, ``config.json``,
``generation_config.json`` and ``onnx_export.json`` (inputs, outputs, dynamic axes, cache layout).

onnx, onnxscript and onnxruntime are the ``export`` extra; they are imported when a function
needs them, and their absence is a :class:`~tunelab.errors.TunelabError`.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from contextlib import contextmanager
from importlib import import_module, metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.outputs import atomic_output, claim_output

MODEL_FILE = "model.onnx"
METADATA_FILE = "onnx_export.json"
FORMAT_VERSION = 1
# Weights past this size go to an external data file (protobuf files cannot exceed 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
EXPORT_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a neural network is.",
)


def _require(*packages: str) -> None:
    """Import-check optional packages; a missing one is a TunelabError naming the extra to install."""
    missing = []
    for package in packages:
        try:
            import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise TunelabError(
            f"ONNX export needs {', '.join(missing)} (not installed): pip install 'tunelab[export]'"
        )


def _past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _position_ids(attention_mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """Positions counting only attended tokens (left padding gets 0), for the last ``seq`` columns."""
    positions = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None).astype(np.int64)
    return positions[:, past_length:]


class _DecoderWithPast(torch.nn.Module):
    """A causal LM whose cache goes in and out as flat tensors (what an ONNX graph can carry)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(key, value) for key, value in past], config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        presents = [tensor for layer in out.cache.layers for tensor in (layer.keys, layer.values)]
        return (out.logits, *presents)


class _DecoderNoCache(torch.nn.Module):
    """A causal LM that takes the whole sequence and returns logits only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits


def _cache_layout(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every cache layer, read from one real forward pass.

    Raises:
        TunelabError: a cache layer that is not a plain full-attention layer (sliding window, ...).
    """
    from transformers.cache_utils import DynamicLayer

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    layout = []
    for index, layer in enumerate(out.cache.layers):
        if type(layer) is not DynamicLayer:
            raise TunelabError(
                f"cache layer {index} of this model is a {type(layer).__name__}; ONNX export with past key/values "
                "supports full-attention caches only. Export with with_past=False (no KV cache) instead."
            )
        layout.append((int(layer.keys.shape[1]), int(layer.keys.shape[3])))
    return layout


@contextmanager
def _quiet_exporter():
    """Hide torch.onnx's progress lines and axis-renaming warnings; errors still surface."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_model_dir(model_dir: Path) -> None:
    from tunelab.models.load import is_adapter_dir

    if not model_dir.is_dir():
        raise TunelabError(f"--model {model_dir}: no such model directory")
    if is_adapter_dir(model_dir):
        raise TunelabError(
            f"--model {model_dir} is a PEFT adapter; merge it into its base first (tunelab merge --adapter "
            f"{model_dir} --out DIR), then export DIR"
        )
    if not (model_dir / "config.json").is_file():
        raise TunelabError(f"--model {model_dir}: not a Hugging Face model directory (no config.json)")


def _load(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from tunelab.config import ModelConfig
    from tunelab.models.load import load_model

    return load_model(ModelConfig(path=str(model_dir)), dtype, torch.device("cpu"), attn_implementation="sdpa").eval()


def _io_description(model_path: Path) -> tuple[list[dict], list[dict], int]:
    """Names, element types and shapes (symbolic axes as strings) of the saved graph, and its opset."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)

    def describe(values) -> list[dict]:
        described = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
            described.append({"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                              "shape": shape})
        return described

    opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    return describe(proto.graph.input), describe(proto.graph.output), int(opset)


def _copy_serving_files(model_dir: Path, out: Path, model: torch.nn.Module) -> None:
    """Tokenizer files (verbatim), chat templates, config.json and generation_config.json."""
    from transformers import GenerationConfig

    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    if (model_dir / "additional_chat_templates").is_dir():
        shutil.copytree(model_dir / "additional_chat_templates", out / "additional_chat_templates")
    model.config.save_pretrained(out)
    if (model_dir / "generation_config.json").is_file():
        shutil.copy2(model_dir / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(model.config).save_pretrained(out)


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    with_past: bool = True,
    opset: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Export a causal LM directory to a self-contained ONNX directory.

    Args:
        model_dir: a Hugging Face model directory with safetensors weights (merge adapters first).
        out_dir: where to write (written to a temporary sibling, flushed and renamed into place).
        with_past: export the decoder with past key/values inputs and present outputs (fast
            generation); False exports a no-cache graph (full sequence in, logits out).
        opset: ONNX opset; None takes torch.onnx's default (recorded in ``onnx_export.json``).
        dtype: weights and activations: float32 (ONNX Runtime CPU) or float16 (for GPU providers).
        overwrite: replace an existing ``out_dir`` (otherwise an existing one is an error).

    Returns:
        The output directory, holding ``model.onnx`` (+ ``model.onnx.data`` for weights of 1 GiB
        or more), tokenizer files, chat template, ``config.json``, ``generation_config.json`` and
        ``onnx_export.json``.

    Raises:
        TunelabError: missing packages, a missing or non-model directory, an adapter directory,
            ``out_dir`` exists (without ``overwrite``) or holds the model, an unsupported dtype, a
            cache layout that cannot export with past, or an exporter failure.

    Example:
        >>> export_onnx("runs/merged", "runs/onnx")  # doctest: +SKIP
        PosixPath('runs/onnx')
    """
    _require("onnx", "onnxscript")
    model_dir, out = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    if dtype not in EXPORT_DTYPES:
        hint = " (ONNX Runtime's CPU provider has no bfloat16 kernels)" if dtype == "bfloat16" else ""
        raise TunelabError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}{hint}")
    _check_model_dir(model_dir)
    claim_output(out, overwrite, "--out", [("model directory", model_dir)])
    torch_dtype = EXPORT_DTYPES[dtype][0]
    model = _load(model_dir, torch_dtype)

    started = time.perf_counter()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    if with_past:
        layout = _cache_layout(model)
        layers, past_length = len(layout), 4
        past = [tuple(torch.zeros(2, kv, past_length, dim, dtype=torch_dtype) for _ in range(2)) for kv, dim in layout]
        attention_mask = torch.ones(2, past_length + 3, dtype=torch.long)
        position_ids = torch.arange(past_length, past_length + 3).expand(2, 3)
        past_seq, total_seq = torch.export.Dim("past_seq"), torch.export.Dim("total_seq")
        wrapper: torch.nn.Module = _DecoderWithPast(model)
        args: tuple = (input_ids, attention_mask, position_ids, past)
        dynamic_shapes: dict[str, Any] = {
            "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total_seq},
            "position_ids": {0: batch, 1: seq},
            "past": [({0: batch, 2: past_seq}, {0: batch, 2: past_seq}) for _ in layout],
        }
        input_names = ["input_ids", "attention_mask", "position_ids", *_past_names(layers)]
        output_names = ["logits", *_present_names(layers)]
    else:
        layout, layers = [], model.config.num_hidden_layers
        attention_mask = torch.ones(2, 3, dtype=torch.long)
        position_ids = torch.arange(3).expand(2, 3)
        wrapper = _DecoderNoCache(model)
        args = (input_ids, attention_mask, position_ids)
        dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                          "position_ids": {0: batch, 1: seq}}
        input_names, output_names = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    wrapper.eval()

    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, opset_version=opset, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the model and the cause
        raise TunelabError(
            f"--model {model_dir}: torch.onnx.export(dynamo=True) failed for {type(model).__name__}"
            f"{' with past key/values (try with_past=False)' if with_past else ''}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    export_seconds = time.perf_counter() - started

    with atomic_output(out, what="ONNX export") as tmp:  # written beside, flushed, then renamed into place
        _write_export(program, model, model_dir, tmp, dtype, with_past, layout, layers, export_seconds)
    return out


def _write_export(program: Any, model: torch.nn.Module, model_dir: Path, tmp: Path, dtype: str, with_past: bool,
                  layout: list[tuple[int, int]], layers: int, export_seconds: float) -> None:
    """Write the ONNX graph, the serving files and ``onnx_export.json`` into ``tmp``."""
    import onnx

    from tunelab.models.load import load_tokenizer, stop_token_ids

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes >= EXTERNAL_DATA_BYTES
    program.save(tmp / MODEL_FILE, external_data=external)
    onnx.checker.check_model(str(tmp / MODEL_FILE))
    _copy_serving_files(model_dir, tmp, model)

    inputs, outputs, used_opset = _io_description(tmp / MODEL_FILE)
    tokenizer = load_tokenizer(str(tmp))
    description = {
        "format": "tunelab-onnx-causal-lm",
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "external_data": f"{MODEL_FILE}.data" if (tmp / f"{MODEL_FILE}.data").is_file() else None,
        "source": str(model_dir),
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": used_opset,
        "dtype": dtype,
        "with_past": with_past,
        "past_key_values_inputs": _past_names(layers) if with_past else [],
        "present_outputs": _present_names(layers) if with_past else [],
        "num_layers": layers,
        "num_kv_heads": [kv for kv, _ in layout] if with_past else None,
        "head_dim": [dim for _, dim in layout] if with_past else None,
        "vocab_size": model.config.vocab_size,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {io["name"]: {str(axis): dim for axis, dim in enumerate(io["shape"]) if isinstance(dim, str)}
                         for io in inputs + outputs},
        "chat_template": bool(tokenizer.chat_template),
        "eos_token_ids": sorted(stop_token_ids(str(tmp), tokenizer)),
        "export_seconds": round(export_seconds, 2),
        "versions": {name: metadata.version(name) for name in ("torch", "transformers", "onnx", "onnxscript")},
    }
    if with_past and len(set(layout)) == 1:  # the common case: one number each
        description["num_kv_heads"], description["head_dim"] = layout[0]
    (tmp / METADATA_FILE).write_text(json.dumps(description, indent=2) + "\n")


class OnnxParityError(TunelabError):
    """An export whose logits or generations differ from transformers'; ``result`` holds the measurements."""

    def __init__(self, result: dict, message: str):
        super().__init__(message)
        self.result = result


def read_export_metadata(onnx_dir: str | Path) -> dict:
    """``onnx_export.json`` of an exported directory.

    Raises:
        TunelabError: not a directory written by :func:`export_onnx`.
    """
    path = Path(onnx_dir) / METADATA_FILE
    if not path.is_file() or not (Path(onnx_dir) / MODEL_FILE).is_file():
        raise TunelabError(f"{onnx_dir}: not a tunelab ONNX export (no {MODEL_FILE} and {METADATA_FILE})")
    return json.loads(path.read_text())


class OnnxGenerator:
    """Greedy generation with ONNX Runtime from a directory written by :func:`export_onnx`.

    With past key/values the prompt runs once (prefill, empty past) and every further step feeds
    one token and the previous step's ``present.*`` tensors; without, each step re-runs the
    whole sequence.

    Args:
        onnx_dir: the export directory.
        providers: ONNX Runtime execution providers (default: CPUExecutionProvider).
        threads: intra-op threads (default: ONNX Runtime's choice).

    Raises:
        TunelabError: onnxruntime missing, or not an export directory.

    Example:
        >>> generator = OnnxGenerator("runs/onnx")  # doctest: +SKIP
        >>> generator.generate([1, 5, 9], max_new_tokens=8, eos_ids={2})  # doctest: +SKIP
    """

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, threads: int | None = None):
        _require("onnxruntime")
        import onnxruntime as ort

        self.onnx_dir = Path(onnx_dir)
        self.metadata = read_export_metadata(self.onnx_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.onnx_dir / MODEL_FILE), options, providers=providers or ["CPUExecutionProvider"]
        )
        self.with_past: bool = self.metadata["with_past"]
        self.past_names: list[str] = self.metadata["past_key_values_inputs"]
        self.np_dtype = EXPORT_DTYPES[self.metadata["dtype"]][1]
        shapes = {io["name"]: io["shape"] for io in self.metadata["inputs"]}
        # kv_heads and head_dim per past input: its static axes 1 and 3.
        self._past_shapes = {name: (shapes[name][1], shapes[name][3]) for name in self.past_names}

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past key/values of length 0 for a prefill step."""
        return {name: np.zeros((batch, kv, 0, dim), dtype=self.np_dtype)
                for name, (kv, dim) in self._past_shapes.items()}

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One model call: logits for ``input_ids`` and (with past) the updated cache.

        Args:
            input_ids: [batch, seq] int64, left-padded.
            attention_mask: [batch, past + seq] int64 (1 for real tokens).
            past: the cache from the previous call, or None for a prefill.

        Returns:
            logits [batch, seq, vocab] and the present cache keyed by the next call's input names
            (empty without past).
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": _position_ids(attention_mask, attention_mask.shape[1] - input_ids.shape[1])}
        if self.with_past:
            feed.update(past if past is not None else self.empty_past(input_ids.shape[0]))
        outputs = self.session.run(None, feed)
        return outputs[0], dict(zip(self.past_names, outputs[1:]))

    def generate(self, input_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
        """Greedy continuation of one prompt.

        Args:
            input_ids: the prompt's token ids (chat template already applied).
            max_new_tokens: the most tokens to generate.
            eos_ids: generation stops after producing any of these.

        Returns:
            The new token ids, ending with the EOS id that stopped generation if one did
            (as transformers' ``generate`` returns them).
        """
        tokens = list(input_ids)
        new: list[int] = []
        past = None
        step_ids = np.array([tokens], dtype=np.int64)
        for _ in range(max_new_tokens):
            mask = np.ones((1, len(tokens)), dtype=np.int64)
            logits, present = self.forward(step_ids, mask, past)
            token = int(np.argmax(logits[0, -1]))
            new.append(token)
            tokens.append(token)
            if token in eos_ids:
                break
            if self.with_past:
                past, step_ids = present, np.array([[token]], dtype=np.int64)
            else:
                step_ids = np.array([tokens], dtype=np.int64)
        return new


def _parity_batch(tokenizer, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and attention mask for prompts of different lengths."""
    longest = max(len(ids) for ids in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(prompts), longest), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return ids, mask


def verify_onnx(
    model_dir: str | Path,
    onnx_dir: str | Path,
    prompts: list[str] | None = None,
    max_new_tokens: int = 16,
    atol: float = 1e-4,
) -> dict:
    """Check an ONNX export against transformers: logits and greedy generations.

    Prompts are rendered with the exported tokenizer's chat template (one user turn each; the
    built-in chatml template when the tokenizer has none). Logits are compared on a left-padded
    batch of all prompts (real tokens only; padded positions are meaningless) and, with past,
    on one decode step fed the exported cache. Then each prompt is generated greedily both ways.

    Args:
        model_dir: the Hugging Face model directory that was exported.
        onnx_dir: the directory written by :func:`export_onnx`.
        prompts: user messages (default: three built-in ones).
        max_new_tokens: tokens to generate per prompt.
        atol: largest allowed absolute logit difference (1e-4 suits float32; use about 1e-2
            for float16 exports, which also need a provider with float16 kernels).

    Returns:
        ``max_abs_diff``, ``atol``, ``generations_equal``, ``onnx_tokens`` and ``transformers_tokens``
        (lists of new-token lists), ``prompts``, ``with_past``, and timings: ``onnx_seconds``,
        ``transformers_seconds`` (generation, all prompts), ``new_tokens``,
        ``onnx_tokens_per_s``, ``transformers_tokens_per_s``.

    Raises:
        TunelabError: missing packages or directories.
        OnnxParityError: (a TunelabError) logits further apart than ``atol``, or different
            generations (the message names the first prompt that differs); its ``result`` is
            the dict described above.
    """
    _require("onnxruntime")
    from transformers import GenerationConfig

    from tunelab.data.templates import render_prompt, resolve_template
    from tunelab.models.load import generation_stop_ids, load_tokenizer

    model_dir, onnx_dir = Path(model_dir).expanduser(), Path(onnx_dir).expanduser()
    _check_model_dir(model_dir)
    generator = OnnxGenerator(onnx_dir)
    dtype = generator.metadata["dtype"]
    model = _load(model_dir, EXPORT_DTYPES[dtype][0])
    tokenizer = load_tokenizer(str(onnx_dir))
    template = resolve_template(tokenizer, "auto", fallback="chatml")
    prompts = list(prompts or DEFAULT_PROMPTS)
    rendered = [render_prompt(tokenizer, template, [{"role": "user", "content": prompt}]) for prompt in prompts]
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in rendered]
    eos_ids = generation_stop_ids(model.generation_config, tokenizer)

    # Logits: a left-padded batch (prefill), then one decode step on the exported cache.
    ids, mask = _parity_batch(tokenizer, encoded)
    onnx_logits, present = generator.forward(ids, mask)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=torch.from_numpy(_position_ids(mask)),
                    use_cache=generator.with_past)
    real = mask.astype(bool)
    max_abs_diff = float(np.abs(out.logits.float().numpy()[real] - onnx_logits.astype(np.float32)[real]).max())
    if generator.with_past:
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        next_mask = torch.cat([mask_t, torch.ones_like(next_ids)], dim=1)
        with torch.no_grad():
            step = model(input_ids=next_ids, attention_mask=next_mask, cache=out.cache,
                         position_ids=torch.from_numpy(_position_ids(next_mask.numpy(), mask.shape[1]))).logits
        onnx_step, _ = generator.forward(next_ids.numpy(), next_mask.numpy(), present)
        max_abs_diff = max(max_abs_diff, float(np.abs(step.float().numpy() - onnx_step.astype(np.float32)).max()))

    # Greedy generation, one prompt at a time both ways.
    # A fresh config: the model's own may sample or penalise repeats, which the ONNX loop does not.
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos_ids),
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)

    def hf_generate(prompt: list[int]) -> list[int]:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
        return output[0, len(prompt):].tolist()

    generator.generate(encoded[0], 2, set())  # warm-up both sides, so timings compare steady states
    hf_generate(encoded[0])
    onnx_tokens, hf_tokens = [], []
    started = time.perf_counter()
    for prompt in encoded:
        onnx_tokens.append(generator.generate(prompt, max_new_tokens, eos_ids))
    onnx_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for prompt in encoded:
        hf_tokens.append(hf_generate(prompt))
    hf_seconds = time.perf_counter() - started

    new_tokens = sum(len(tokens) for tokens in onnx_tokens)
    result = {
        "max_abs_diff": max_abs_diff,
        "atol": atol,
        "generations_equal": onnx_tokens == hf_tokens,
        "onnx_tokens": onnx_tokens,
        "transformers_tokens": hf_tokens,
        "prompts": prompts,
        "with_past": generator.with_past,
        "new_tokens": new_tokens,
        "onnx_seconds": onnx_seconds,
        "transformers_seconds": hf_seconds,
        "onnx_tokens_per_s": new_tokens / onnx_seconds if onnx_seconds else None,
        "transformers_tokens_per_s": sum(len(t) for t in hf_tokens) / hf_seconds if hf_seconds else None,
    }
    if not max_abs_diff <= atol:  # also catches NaN
        raise OnnxParityError(result,
            f"ONNX export {onnx_dir} does not match {model_dir}: "
            f"max |logit difference| {max_abs_diff:.3g} > atol {atol:g}"
        )
    if not result["generations_equal"]:
        first = next(i for i, (a, b) in enumerate(zip(onnx_tokens, hf_tokens)) if a != b)
        raise OnnxParityError(result,
            f"ONNX export {onnx_dir}: greedy generation differs from transformers on prompt {first} "
            f"({prompts[first]!r}): onnx {onnx_tokens[first]} vs transformers {hf_tokens[first]} "
            f"(max |logit difference| {max_abs_diff:.3g})"
        )
    return result
