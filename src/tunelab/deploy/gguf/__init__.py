"""``tunelab export --format gguf``: an HF model directory as one llama.cpp GGUF file.

The ``gguf`` package (the ``export`` extra) writes and reads the file and knows llama.cpp's tensor
names; it has no converter from Hugging Face checkpoints, so this package is that converter for
Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (``archs`` says what differs between them):

* hyperparameters from ``config.json`` as ``ARCH.*`` metadata;
* tensors renamed to llama.cpp's names; for Llama and Mistral the Q and K projections permuted
  from the HF layout (RoPE rotates the two halves of each head) to llama.cpp's (RoPE rotates
  adjacent pairs); Gemma's norm weights stored plus one;
* 1-D tensors (norms, biases) kept float32, matrices written as f32, f16 or q8_0 (a matrix whose
  row length is not a multiple of q8_0's 32-value block is written f16, as llama.cpp does);
* the tokenizer: byte-level BPE (``tokenizer.ggml.model = "gpt2"`` with a named pre-tokenizer
  preset) or SentencePiece (``"llama"``, from ``tokenizer.model``), special ids, the end-of-turn
  token from ``generation_config.json`` and the chat template.

:func:`verify_gguf` reads a file back and checks every tensor and the tokenizer against the HF
directory; :func:`check_with_llama_cpp` runs the file in llama.cpp when llama-cpp-python is installed.

Modules:

* ``archs``: the supported families, their GGUF hyperparameters and the settings llama.cpp cannot express;
* ``hf_checkpoint``: config.json, Llama-3.1 RoPE factors, safetensors weights;
* ``tensors``: llama.cpp tensor names, the Q/K permutation, norm shifts, each tensor's type (the tensor plan);
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

from tunelab.deploy.gguf.archs import ARCHS, SUPPORTED_MODEL_TYPES, arch_of, gguf_hparams
from tunelab.deploy.gguf.bpe import PRE_TOKENIZER_PRESETS, gguf_bpe_tokenize
from tunelab.deploy.gguf.hf_checkpoint import llama3_rope_factors
from tunelab.deploy.gguf.llama_cpp_check import check_with_llama_cpp
from tunelab.deploy.gguf.reader import read_gguf
from tunelab.deploy.gguf.tensors import OUTTYPES, Q8_0_BLOCK, ROPE_FREQS, permute_qk, unpermute_qk
from tunelab.deploy.gguf.tokenizer import detect_pre_tokenizer
from tunelab.deploy.gguf.verify import verify_gguf
from tunelab.deploy.gguf.verify_tokenizer import _TOKENIZER_PROBES
from tunelab.deploy.gguf.writer import F16_MAX, export_gguf

__all__ = [
    "ARCHS",
    "F16_MAX",
    "OUTTYPES",
    "PRE_TOKENIZER_PRESETS",
    "Q8_0_BLOCK",
    "ROPE_FREQS",
    "SUPPORTED_MODEL_TYPES",
    "_TOKENIZER_PROBES",
    "arch_of",
    "check_with_llama_cpp",
    "detect_pre_tokenizer",
    "export_gguf",
    "gguf_hparams",
    "gguf_bpe_tokenize",
    "llama3_rope_factors",
    "permute_qk",
    "read_gguf",
    "unpermute_qk",
    "verify_gguf",
]
