"""tunelab merge: merged weights give the logits of base + adapter; quantized bases are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ALPACA_DEMO, make_config, run_cli
from tunelab.config import config_from_dict
from tunelab.eval.suite import EvalOptions, run_eval
from tunelab.models.load import generation_stop_ids, load_for_inference
from tunelab.train.engine import train


def test_merged_model_equals_base_plus_adapter(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "lora", "rank": 4, "alpha": 16},
                         train={"max_steps": 3, "lr": 1e-2})
    adapter = train(config_from_dict(config)).final_dir
    merged_dir = tmp_path / "merged"
    result = run_cli("merge", "--adapter", str(adapter), "--out", str(merged_dir))
    assert result.returncode == 0, result.stderr
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 99, 4, 230, 31, 8]])
    with torch.no_grad():
        expected, actual = with_adapter(ids).logits, merged(ids).logits
    assert (actual - expected).abs().max() < 1e-5
    assert not torch.equal(actual, AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits)  # the adapter mattered

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    eos = json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos and tokenizer.eos_token_id in eos

    # tunelab eval loads an adapter directory (base from its config) and scores it like the merged model.
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in
                            [("Name a colour.", "Blue."), ("Say hi.", "Hi there!"), ("2 + 2?", "4")]))
    perplexities = []
    for model_dir in (adapter, merged_dir):
        model, tok = load_for_inference(str(model_dir), device=torch.device("cpu"))
        results = run_eval(model, tok, [str(data)], tmp_path / f"eval-{model_dir.name}",
                           EvalOptions(metrics=["perplexity"]), generation_stop_ids(model.generation_config, tok))
        perplexities.append(results["metrics"]["perplexity"])
    assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-5)

    half = run_cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "half"), "--dtype", "bfloat16")
    assert half.returncode == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "half").dtype == torch.bfloat16


def test_merging_into_a_quantized_base_is_refused(tmp_path, tiny_model):
    quantized = tmp_path / "base-4bit"
    shutil.copytree(tiny_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(quantized),
                                                             "r": 4, "target_modules": ["q_proj"]}))
    result = run_cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bitsandbytes 4-bit" in result.stderr and "Dequantise first" in result.stderr
    not_adapter = run_cli("merge", "--adapter", str(tiny_model), "--out", str(tmp_path / "n"))
    assert not_adapter.returncode == 2 and "not a PEFT adapter directory" in not_adapter.stderr


def test_export_cli_writes_and_verifies_onnx_and_gguf(tmp_path, tiny_model):
    gguf = run_cli("export", "--format", "gguf", "--model", str(tiny_model), "--out", str(tmp_path / "m.gguf"),
                   "--outtype", "q8_0")
    assert gguf.returncode == 0, gguf.stderr
    assert "verified by reading it back: 21 tensors" in gguf.stdout and (tmp_path / "m.gguf").is_file()
    onnx = run_cli("export", "--format", "onnx", "--model", str(tiny_model), "--out", str(tmp_path / "onnx"))
    assert onnx.returncode == 0, onnx.stderr
    assert "greedy generations equal: True" in onnx.stdout and (tmp_path / "onnx" / "model.onnx").is_file()
    refused = run_cli("export", "--format", "gguf", "--model", str(tmp_path / "onnx"), "--out", str(tmp_path / "x.gguf"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
