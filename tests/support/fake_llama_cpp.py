"""A small stand-in for llama-cpp-python's ``Llama``, to test tunelab's llama.cpp path where it is not installed.

The shape follows llama-cpp-python's source (``llama_cpp/llama.py``, 0.3.x): ``Llama(model_path,
n_ctx, n_threads, logits_all, verbose)``; ``tokenize(text: bytes, add_bos, special) -> list[int]``;
``reset()`` sets ``n_tokens`` to 0; ``eval(tokens)`` appends the tokens after the first ``n_tokens``
and writes one row of logits per token into ``scores`` (an ``[n_ctx, n_vocab]`` float32 array) at
their positions. Inside, the model is the GGUF file read by transformers, run over the whole
prefix at each ``eval``, and tokenization is tunelab's re-implementation of llama.cpp's BPE: this
tests how tunelab drives llama.cpp, not llama.cpp.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch


class Llama:
    """``llama_cpp.Llama`` with the attributes and methods tunelab uses."""

    def __init__(self, model_path: str, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = False,
                 verbose: bool = True) -> None:
        from transformers import AutoModelForCausalLM

        from tunelab.deploy.gguf import read_gguf

        if not logits_all:
            raise AssertionError("tunelab reads the logits of every position: logits_all=True")
        path = Path(model_path)
        self.metadata = read_gguf(path)["metadata"]
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        self.scores = np.zeros((n_ctx, self.model.config.vocab_size), dtype=np.float32)
        self.input_ids = np.zeros(n_ctx, dtype=np.intc)
        self.n_tokens = 0

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        from tunelab.deploy.gguf import gguf_bpe_tokenize

        if not special:
            raise AssertionError("chat prompts hold special tokens: special=True")
        bos = [self.metadata["tokenizer.ggml.bos_token_id"]] if add_bos else []
        return bos + gguf_bpe_tokenize(text.decode("utf-8"), self.metadata)

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, tokens: list[int]) -> None:
        end = self.n_tokens + len(tokens)
        if end > len(self.scores):
            raise ValueError(f"{end} tokens do not fit n_ctx {len(self.scores)}")
        self.input_ids[self.n_tokens:end] = tokens
        with torch.no_grad():
            logits = self.model(torch.tensor([self.input_ids[:end].tolist()])).logits[0]
        self.scores[self.n_tokens:end] = logits[self.n_tokens:end].numpy()
        self.n_tokens = end


def install(monkeypatch) -> None:
    """Make ``import llama_cpp`` give this module's ``Llama``."""
    module = ModuleType("llama_cpp")
    module.Llama = Llama
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
