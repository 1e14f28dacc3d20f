"""Optional: running a GGUF file in llama.cpp (llama-cpp-python) and comparing it with transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tunelab.deploy.gguf.reader import read_gguf
from tunelab.deploy.gguf.tokenizer import _generation_stop_ids, _load_hf_tokenizer
from tunelab.errors import TunelabError


def check_with_llama_cpp(model_dir: str | Path, gguf_file: str | Path, prompt: str | None = None,
                         max_new_tokens: int = 8) -> dict[str, Any]:
    """Load the GGUF file with llama-cpp-python and compare it with the HF model (needs ``llama_cpp``).

    Checks that llama.cpp tokenizes ``prompt`` (special tokens parsed) to the HF ids, and compares
    the logits of every prompt position with transformers' float32 logits; then generates greedily
    with both and reports whether the continuations agree (random tiny models have near-ties, so
    that is reported, not required).

    Returns:
        ``{"tokens_match", "max_abs_logit_diff", "max_abs_logit", "greedy_match", "hf_continuation",
        "gguf_continuation"}``.

    Raises:
        TunelabError: llama-cpp-python is not installed, the tokenization differs, or the logits
            differ by more than the file type allows (f32 1e-3, f16 2e-2, q8_0 1e-1 of the largest logit).
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise TunelabError("checking a GGUF file in llama.cpp needs llama-cpp-python "
                           "(pip install llama-cpp-python; it builds from source)") from None
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, gguf_file = Path(model_dir), Path(gguf_file)
    hf_tok = _load_hf_tokenizer(model_dir)
    if prompt is None:
        messages = [{"role": "user", "content": "What is 12 + 30?"}]
        prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
            if hf_tok.chat_template else "What is 12 + 30? The answer is"
    hf_ids = hf_tok.encode(prompt, add_special_tokens=True)
    llm = Llama(model_path=str(gguf_file), n_ctx=max(64, len(hf_ids) + max_new_tokens + 8), n_threads=2,
                logits_all=True, verbose=False)
    add_bos = bool(read_gguf(gguf_file)["metadata"].get("tokenizer.ggml.add_bos_token", False))
    gguf_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    tokens_match = list(gguf_ids) == list(hf_ids)
    if not tokens_match:
        raise TunelabError(f"llama.cpp tokenizes the prompt as {list(gguf_ids)[:16]}..., HF as {hf_ids[:16]}...")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(torch.tensor([hf_ids])).logits[0].numpy()
    llm.reset()
    llm.eval(hf_ids)
    gguf_logits = np.asarray(llm.scores[: len(hf_ids)], dtype=np.float32)
    diff = float(np.abs(gguf_logits - hf_logits).max())
    scale = float(np.abs(hf_logits).max())
    outtype = {0: "f32", 1: "f16", 7: "q8_0"}.get(read_gguf(gguf_file)["metadata"].get("general.file_type"), "q8_0")
    tolerance = {"f32": 1e-3, "f16": 2e-2, "q8_0": 1e-1}[outtype] * max(scale, 1.0)
    if diff > tolerance:
        raise TunelabError(f"llama.cpp logits differ from transformers' by {diff:.4g} (largest logit {scale:.4g})")
    with torch.no_grad():
        hf_out = model.generate(torch.tensor([hf_ids]), max_new_tokens=max_new_tokens, do_sample=False)[0]
    hf_new = hf_out[len(hf_ids):].tolist()
    gguf_new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        gguf_new.append(next_id)
        if next_id in _generation_stop_ids(model_dir) or next_id == hf_tok.eos_token_id:
            break
        llm.eval([next_id])
    return {"tokens_match": tokens_match, "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "greedy_match": gguf_new == hf_new[: len(gguf_new)], "hf_continuation": hf_new,
            "gguf_continuation": gguf_new}
