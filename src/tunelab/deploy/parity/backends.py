"""The models ``tunelab verify`` runs, one class per way of running them, all with the same four methods.

* :class:`TransformersModel`: an adapter on its base, an HF directory, or a GGUF file read back by
  transformers' own GGUF loader (dequantised to float32);
* :class:`LlamaCppModel`: a GGUF file in llama.cpp (llama-cpp-python);
* :class:`OnnxModel`: a tunelab ONNX export in ONNX Runtime;
* :class:`ServedModel`: a running OpenAI-compatible server (``tunelab serve``, vLLM, llama.cpp's server).

Each renders a prompt with its own chat template and tokenizer (``prompt_ids``, None where it
cannot be seen), gives the logits of a token sequence (``logits``, None for a server) and answers
greedily with its own stop tokens (``answer``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tunelab.deploy.parity.specs import ModelSpec
from tunelab.errors import TunelabError

_GGUF_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}
_DTYPE_CLASSES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
LLAMA_CPP_MISSING = ("llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp from "
                     "source, about 11 minutes on 2 cores)")


@dataclass
class Answer:
    """A greedy answer: token ids (None from a server), text (from a server), how it stopped, prompt length."""

    ids: list[int] | None
    stop: int | str | None  # the stop token id; "stop" from a server; None: it ran to the token limit
    text: str | None = None
    prompt_tokens: int | None = None


class ParityModel(Protocol):
    """What the gate needs of a model."""

    name: str
    kind: str  # adapter, hf, gguf, onnx or url
    reader: str  # how it is run: transformers, llama.cpp, onnxruntime, http
    precision: str  # a class of :mod:`tunelab.deploy.parity.thresholds`
    notes: list[str]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int] | None:
        """The token ids this model would be fed for ``messages`` (None where that cannot be seen)."""

    def logits(self, ids: list[int]) -> np.ndarray | None:
        """Float32 logits ``[len(ids), vocab]`` of the sequence (None where the model gives none)."""

    def answer(self, messages: list[dict[str, str]], prompt_ids: list[int], max_new_tokens: int) -> Answer:
        """Its greedy answer to ``messages`` (``prompt_ids`` for models that take ids)."""

    def close(self) -> None:
        """Free the model."""


def _greedy_config(stop_ids: set[int], pad_token_id: int | None, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    # A fresh config: a model's own may sample or penalise repeats, which a parity check must not.
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids),
                            pad_token_id=pad_token_id if pad_token_id is not None else min(stop_ids), use_cache=True)


def _stop_of(new_ids: list[int], stop_ids: set[int]) -> int | None:
    return new_ids[-1] if new_ids and new_ids[-1] in stop_ids else None


def _hf_encoder(tokenizer: Any) -> Any:
    """Prompt rendering as tunelab serves it: the tokenizer's chat template, no special tokens added."""
    from tunelab.data.templates import render_prompt, resolve_template

    template = resolve_template(tokenizer, "auto")

    def encode(messages: list[dict[str, str]]) -> list[int]:
        return tokenizer(render_prompt(tokenizer, template, messages), add_special_tokens=False).input_ids

    return encode


@dataclass
class TransformersModel:
    """A transformers model (float32 on the CPU): an adapter, an HF directory, or a GGUF file read back."""

    name: str
    kind: str
    model: Any
    encoder: Any  # messages -> ids, or None
    stop_ids: set[int]
    pad_token_id: int | None
    precision: str
    reader: str = "transformers"
    tokenizer: Any = None  # the HF tokenizer, where the model has one (to decode answers)
    notes: list[str] = field(default_factory=list)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int] | None:
        return self.encoder(messages) if self.encoder is not None else None

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()

    def answer(self, messages: list[dict[str, str]], prompt_ids: list[int], max_new_tokens: int) -> Answer:
        import torch

        config = _greedy_config(self.stop_ids, self.pad_token_id, max_new_tokens)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            output = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = output[0, len(prompt_ids):].tolist()
        return Answer(new, _stop_of(new, self.stop_ids))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids as a server returns it (special tokens dropped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        self.model = None  # the tokenizer stays: a closed reference still decodes answers


def _dir_precision(model_dir: Path) -> str:
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPE_CLASSES.get(str(dtype).removeprefix("torch."), "f32")


def open_transformers(spec: ModelSpec) -> TransformersModel:
    """An adapter (on the base its config names) or an HF directory, in float32."""
    import torch
    from peft import PeftConfig

    from tunelab.models.load import generation_stop_ids, load_for_inference

    model, tokenizer = load_for_inference(str(spec.path), device=torch.device("cpu"), dtype=torch.float32)
    base = Path(PeftConfig.from_pretrained(str(spec.path)).base_model_name_or_path) if spec.kind == "adapter" \
        else spec.path
    return TransformersModel(spec.name, spec.kind, model, _hf_encoder(tokenizer),
                             generation_stop_ids(model.generation_config, tokenizer), tokenizer.pad_token_id,
                             _dir_precision(base), tokenizer=tokenizer)


@dataclass
class _GgufVocabulary:
    """A GGUF file's own prompt rendering: its chat template, its vocabulary, llama.cpp's BPE and BOS rule."""

    metadata: dict[str, Any]

    @property
    def stop_ids(self) -> set[int]:
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return {int(self.metadata[k]) for k in keys if self.metadata.get(k) is not None}

    def token(self, key: str) -> str:
        token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
        return self.metadata["tokenizer.ggml.tokens"][token_id] if token_id is not None else ""

    def render(self, messages: list[dict[str, str]]) -> str | None:
        """The prompt text from the file's chat template (None: the file has none)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                            bos_token=self.token("bos"), eos_token=self.token("eos"))
        return rendered[0]

    def adds_bos(self, text: str) -> bool:
        bos = self.token("bos")
        return bool(self.metadata.get("tokenizer.ggml.add_bos_token")) and bool(bos) and not text.startswith(bos)

    def encode(self, messages: list[dict[str, str]]) -> list[int] | None:
        """Ids the way llama.cpp tokenizes the rendered prompt (byte-level BPE vocabularies only)."""
        from tunelab.deploy.gguf import gguf_bpe_tokenize

        text = self.render(messages)
        if text is None or self.metadata.get("tokenizer.ggml.model") != "gpt2":
            return None
        ids = gguf_bpe_tokenize(text, self.metadata)
        return ([int(self.metadata["tokenizer.ggml.bos_token_id"])] if self.adds_bos(text) else []) + ids

    def notes(self) -> list[str]:
        if not self.metadata.get("tokenizer.chat_template"):
            return ["the file has no chat template: its prompt tokens are not checked"]
        if self.metadata.get("tokenizer.ggml.model") != "gpt2":
            return ["a SentencePiece vocabulary: prompt tokens are checked by llama.cpp only"]
        return []


def _gguf_precision(metadata: dict[str, Any]) -> str:
    return _GGUF_FILE_TYPES.get(metadata.get("general.file_type"), "quantized")


def open_gguf_transformers(spec: ModelSpec) -> TransformersModel:
    """A GGUF file read back by transformers' GGUF loader (an independent reader of tunelab's export)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.deploy.gguf import read_gguf

    metadata = read_gguf(spec.path)["metadata"]
    vocabulary = _GgufVocabulary(metadata)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' per-tensor tqdm bar, not switchable off
            model = AutoModelForCausalLM.from_pretrained(str(spec.path.parent), gguf_file=spec.path.name,
                                                         dtype=torch.float32).eval()
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:
        raise TunelabError(f"--model gguf:{spec.location}: transformers cannot read this file "
                           f"({str(exc)[:300]}); llama-cpp-python can (pip install llama-cpp-python)") from None
    stop_ids = vocabulary.stop_ids
    return TransformersModel(spec.name, "gguf", model, vocabulary.encode, stop_ids,
                             metadata.get("tokenizer.ggml.padding_token_id"), _gguf_precision(metadata),
                             notes=vocabulary.notes())


@dataclass
class LlamaCppModel:
    """A GGUF file in llama.cpp (llama-cpp-python), greedy, on the CPU."""

    name: str
    llm: Any
    vocabulary: _GgufVocabulary
    precision: str
    kind: str = "gguf"
    reader: str = "llama.cpp"
    notes: list[str] = field(default_factory=list)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int] | None:
        text = self.vocabulary.render(messages)
        if text is None:
            return None
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=self.vocabulary.adds_bos(text), special=True))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)], dtype=np.float32)

    def answer(self, messages: list[dict[str, str]], prompt_ids: list[int], max_new_tokens: int) -> Answer:
        stop_ids = self.vocabulary.stop_ids
        self.llm.reset()
        self.llm.eval(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(token)
            if token in stop_ids:
                break
            self.llm.eval([token])
        return Answer(new, _stop_of(new, stop_ids))

    def close(self) -> None:
        self.llm = None


def open_llama_cpp(spec: ModelSpec, n_ctx: int) -> LlamaCppModel:
    """A GGUF file in llama-cpp-python.

    Raises:
        TunelabError: llama-cpp-python is missing (:data:`LLAMA_CPP_MISSING`).
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise TunelabError(LLAMA_CPP_MISSING) from None
    import torch

    from tunelab.deploy.gguf import read_gguf

    metadata = read_gguf(spec.path)["metadata"]
    try:
        llm = Llama(model_path=str(spec.path), n_ctx=n_ctx, n_threads=torch.get_num_threads(), logits_all=True,
                    verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise TunelabError(f"--model gguf:{spec.location}: llama.cpp cannot load this file ({exc})") from None
    vocabulary = _GgufVocabulary(metadata)
    notes = [n for n in vocabulary.notes() if "SentencePiece" not in n]
    return LlamaCppModel(spec.name, llm, vocabulary, _gguf_precision(metadata), notes=notes)


@dataclass
class OnnxModel:
    """A tunelab ONNX export in ONNX Runtime (CPU)."""

    name: str
    generator: Any
    encoder: Any
    stop_ids: set[int]
    precision: str
    tokenizer: Any
    kind: str = "onnx"
    reader: str = "onnxruntime"
    notes: list[str] = field(default_factory=list)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encoder(messages)

    def logits(self, ids: list[int]) -> np.ndarray:
        batch = np.asarray([ids], dtype=np.int64)
        logits, _ = self.generator.forward(batch, np.ones_like(batch))
        return logits[0].astype(np.float32)

    def answer(self, messages: list[dict[str, str]], prompt_ids: list[int], max_new_tokens: int) -> Answer:
        new = self.generator.generate(prompt_ids, max_new_tokens, self.stop_ids)
        return Answer(new, _stop_of(new, self.stop_ids))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids as a server returns it (special tokens dropped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        self.generator = None


def open_onnx(spec: ModelSpec) -> OnnxModel:
    """A directory written by ``tunelab export --format onnx``."""
    from transformers import GenerationConfig

    from tunelab.deploy.onnx import OnnxGenerator
    from tunelab.models.load import generation_stop_ids, load_tokenizer

    generator = OnnxGenerator(spec.path)
    tokenizer = load_tokenizer(str(spec.path))
    generation = GenerationConfig.from_pretrained(spec.path) if (spec.path / "generation_config.json").is_file() \
        else None
    precision = _DTYPE_CLASSES.get(generator.metadata.get("dtype", "float32"), "f32")
    return OnnxModel(spec.name, generator, _hf_encoder(tokenizer), generation_stop_ids(generation, tokenizer),
                     precision, tokenizer)


@dataclass
class ServedModel:
    """A running OpenAI-compatible server, asked through ``/chat/completions`` at temperature 0."""

    name: str
    base_url: str
    model: str
    api_key_env: str | None
    timeout: float = 300.0
    kind: str = "url"
    reader: str = "http"
    precision: str = "served"
    notes: list[str] = field(default_factory=list)

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers,
                                         method="POST" if body is not None else "GET")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: no proxy
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise TunelabError(f"--model url:{self.base_url}: HTTP {exc.code} on {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TunelabError(f"--model url:{self.base_url}: cannot reach the server ({reason}); "
                               "is it running?") from None
        except ValueError:
            raise TunelabError(f"--model url:{self.base_url}: {path} did not answer JSON") from None

    def prompt_ids(self, messages: list[dict[str, str]]) -> None:
        return None

    def logits(self, ids: list[int]) -> None:
        return None

    def answer(self, messages: list[dict[str, str]], prompt_ids: list[int], max_new_tokens: int) -> Answer:
        reply = self._request("/chat/completions", {"model": self.model, "messages": messages, "temperature": 0,
                                                    "max_tokens": max_new_tokens})
        try:
            choice = reply["choices"][0]
            text, finish = choice["message"]["content"] or "", choice.get("finish_reason")
        except (KeyError, IndexError, TypeError):
            raise TunelabError(f"--model url:{self.base_url}: not a chat completion: {str(reply)[:200]}") from None
        usage = reply.get("usage") or {}
        return Answer(None, "stop" if finish == "stop" else None, text, usage.get("prompt_tokens"))

    def close(self) -> None:
        pass


def open_served(spec: ModelSpec, api_key_env: str | None) -> ServedModel:
    """A server at ``spec.location`` (``/v1`` added when missing); the model named after ``#``, else its only one."""
    url, _, model = spec.location.partition("#")
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    served = ServedModel(spec.name, url, model, api_key_env)
    if not model:
        names = [m.get("id") for m in served._request("/models").get("data", [])]
        if len(names) != 1:
            raise TunelabError(f"--model url:{spec.location}: the server has models {names}; name one: "
                               f"url:{url}#MODEL")
        served.model = names[0]
    return served
