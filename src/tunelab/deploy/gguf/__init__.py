"""``tunelab export --format gguf``: a Llama-family HF model directory as one llama.cpp GGUF file.

The ``gguf`` package (the ``export`` extra) writes and reads the file; it has no converter from
Hugging Face checkpoints, so this package is that converter for the ``llama`` architecture:

* hyperparameters from ``config.json`` as ``llama.*`` metadata;
* tensors renamed to llama.cpp's names, with the Q and K projections permuted from the HF layout
  (RoPE rotates the two halves of each head) to llama.cpp's (RoPE rotates adjacent pairs);
* 1-D tensors (norms, biases) kept float32, matrices written as f32, f16 or q8_0 (a matrix whose
  row length is not a multiple of q8_0's 32-value block is written f16, as llama.cpp does);
* the tokenizer: byte-level BPE (``tokenizer.ggml.model = "gpt2"`` with a named pre-tokenizer
  preset) or SentencePiece (``"llama"``, from ``tokenizer.model``), special ids, the end-of-turn
  token from ``generation_config.json`` and the chat template.

:func:`verify_gguf` reads a file back and checks every tensor and the tokenizer against the HF
directory; :func:`check_with_llama_cpp` runs the file in llama.cpp when llama-cpp-python is installed.

Modules:

* ``hf_checkpoint``: config.json (Llama only) as ``llama.*`` hyperparameters, RoPE factors, safetensors weights;
* ``tensors``: llama.cpp tensor names, the Q/K permutation, each tensor's type (the tensor plan);
* ``tokenizer``: the HF tokenizer as GGUF vocabulary metadata, pre-tokenizer preset detection;
* ``bpe``: llama.cpp's byte-level BPE tokenization re-implemented, with its pre-tokenizer presets;
* ``writer``: :func:`export_gguf` (metadata, then tensor data);
* ``reader``: :func:`read_gguf`;
* ``verify`` and ``verify_tokenizer``: :func:`verify_gguf`;
* ``llama_cpp_check``: :func:`check_with_llama_cpp`;
* ``gguf_lib``: the lazy import of the optional ``gguf`` package.

Example::

    from tunelab.deploy.gguf import export_gguf, verify_gguf
    path = export_gguf("out/merged", "model-q8_0.gguf", outtype="q8_0")
    print(verify_gguf("out/merged", path)["max_abs_error"])
"""

from tunelab.deploy.gguf.bpe import PRE_TOKENIZER_PRESETS, gguf_bpe_tokenize
from tunelab.deploy.gguf.hf_checkpoint import SUPPORTED_MODEL_TYPES, llama3_rope_factors, llama_hparams
from tunelab.deploy.gguf.llama_cpp_check import check_with_llama_cpp
from tunelab.deploy.gguf.reader import read_gguf
from tunelab.deploy.gguf.tensors import OUTTYPES, Q8_0_BLOCK, ROPE_FREQS, permute_qk, unpermute_qk
from tunelab.deploy.gguf.tokenizer import detect_pre_tokenizer
from tunelab.deploy.gguf.verify import verify_gguf
from tunelab.deploy.gguf.verify_tokenizer import _TOKENIZER_PROBES
from tunelab.deploy.gguf.writer import ARCH, F16_MAX, export_gguf

__all__ = [
    "ARCH",
    "F16_MAX",
    "OUTTYPES",
    "PRE_TOKENIZER_PRESETS",
    "Q8_0_BLOCK",
    "ROPE_FREQS",
    "SUPPORTED_MODEL_TYPES",
    "_TOKENIZER_PROBES",
    "check_with_llama_cpp",
    "detect_pre_tokenizer",
    "export_gguf",
    "gguf_bpe_tokenize",
    "llama3_rope_factors",
    "llama_hparams",
    "permute_qk",
    "read_gguf",
    "unpermute_qk",
    "verify_gguf",
]
