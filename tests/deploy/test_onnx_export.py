"""ONNX export: onnxruntime logits and greedy generations equal transformers'; the directory serves alone."""

from __future__ import annotations

import json
import shutil
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tunelab.deploy.onnx import OnnxGenerator, export_onnx, verify_onnx
from tunelab.errors import TunelabError

needs_export_extra = pytest.mark.skipif(
    not all(find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")), reason="tunelab[export] not installed"
)
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Say hi."]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The tiny model exported once with past key/values (the default)."""
    return export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "with-past")


def _chat_ids(tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False).input_ids


@needs_export_extra
def test_logits_match_transformers_on_a_padded_batch_and_a_decode_step(tiny_model, exported):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [_chat_ids(tokenizer, text) for text in PROMPTS]
    longest = max(map(len, prompts))
    assert min(map(len, prompts)) < longest  # the batch really is padded
    ids = np.zeros((len(prompts), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as for generation
        ids[row, longest - len(prompt):], mask[row, longest - len(prompt):] = prompt, 1
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)

    generator = OnnxGenerator(exported)
    onnx_logits, present = generator.forward(ids, mask)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), use_cache=True)
    real = mask.astype(bool)
    assert np.abs(out.logits.numpy()[real] - onnx_logits[real]).max() < 1e-4
    assert set(present) == {f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")}
    assert present["past_key_values.0.key"].shape == (3, 2, longest, 16)  # [batch, kv_heads, seq, head_dim]

    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    next_mask = torch.cat([torch.from_numpy(mask), torch.ones_like(next_ids)], dim=1)
    with torch.no_grad():
        step = model(input_ids=next_ids, attention_mask=next_mask, cache=out.cache,
                     position_ids=torch.from_numpy(positions[:, -1:] + 1)).logits
    onnx_step, _ = generator.forward(next_ids.numpy(), next_mask.numpy(), present)
    assert np.abs(step.numpy() - onnx_step).max() < 1e-4


@needs_export_extra
def test_verify_greedy_generations_equal_transformers(tiny_model, exported):
    result = verify_onnx(tiny_model, exported, prompts=PROMPTS, max_new_tokens=16)
    assert result["with_past"] and result["max_abs_diff"] < 1e-4
    assert result["generations_equal"] and result["onnx_tokens"] == result["transformers_tokens"]
    assert len(result["onnx_tokens"]) == 3 and all(0 < len(tokens) <= 16 for tokens in result["onnx_tokens"])
    assert result["onnx_seconds"] > 0 and result["transformers_seconds"] > 0


@needs_export_extra
def test_directory_is_self_contained(tiny_model, exported, tmp_path):
    served = shutil.copytree(exported, tmp_path / "served")  # nothing points back at the model directory
    assert {"model.onnx", "onnx_export.json", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in served.iterdir()}
    import onnx

    onnx.checker.check_model(str(served / "model.onnx"))

    tokenizer = AutoTokenizer.from_pretrained(served)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    eos = GenerationConfig.from_pretrained(served).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos and tokenizer.eos_token_id in eos

    described = json.loads((served / "onnx_export.json").read_text())
    assert described["with_past"] and described["exporter"] == "torch.onnx.export(dynamo=True)"
    assert (described["num_layers"], described["num_kv_heads"], described["head_dim"]) == (2, 2, 16)
    assert [io["name"] for io in described["inputs"]] == [
        "input_ids", "attention_mask", "position_ids",
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert [io["name"] for io in described["outputs"]] == [
        "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert described["dynamic_axes"]["past_key_values.0.key"] == {"0": "batch", "2": "past_seq"}
    assert sorted(described["eos_token_ids"]) == sorted(eos)

    prompt = _chat_ids(tokenizer, PROMPTS[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              generation_config=GenerationConfig(max_new_tokens=16, do_sample=False,
                                                                 eos_token_id=eos, pad_token_id=0))
    assert OnnxGenerator(served).generate(prompt, 16, set(eos)) == expected[0, len(prompt):].tolist()


@needs_export_extra
def test_no_cache_variant_generates_the_same(tiny_model, exported, tmp_path):
    plain = export_onnx(tiny_model, tmp_path / "no-cache", with_past=False)
    described = json.loads((plain / "onnx_export.json").read_text())
    assert not described["with_past"] and described["past_key_values_inputs"] == []
    assert [io["name"] for io in described["outputs"]] == ["logits"]
    result = verify_onnx(tiny_model, plain, prompts=PROMPTS, max_new_tokens=16)
    assert result["generations_equal"] and result["max_abs_diff"] < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(plain)
    prompt = _chat_ids(tokenizer, PROMPTS[1])
    assert OnnxGenerator(plain).generate(prompt, 16, {1, 4}) == OnnxGenerator(exported).generate(prompt, 16, {1, 4})


@needs_export_extra
def test_verify_fails_clearly_when_the_weights_differ(tiny_model, exported, tmp_path):
    changed = shutil.copytree(tiny_model, tmp_path / "changed")
    weights = load_file(changed / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] + 0.01
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TunelabError, match="does not match") as failed:
        verify_onnx(changed, exported, prompts=PROMPTS[:1], max_new_tokens=2)
    assert failed.value.result["max_abs_diff"] > 1e-4  # the measurements come with the error


@needs_export_extra
def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TunelabError, match="no such model directory"):
        export_onnx(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TunelabError, match="float32, float16"):
        export_onnx(tmp_path / "nope", tmp_path / "out", dtype="bfloat16")


@needs_export_extra
def test_adapter_directory_and_overwriting_the_model_are_refused(tiny_model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(TunelabError, match="tunelab merge"):
        export_onnx(adapter, tmp_path / "out")
    with pytest.raises(TunelabError, match="is the model directory .* that this command reads"):
        export_onnx(tiny_model, tiny_model)


def test_missing_packages_name_the_extra(monkeypatch, tmp_path):
    """Runs with or without the extra: the packages are hidden, and the check comes before any other."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(TunelabError, match=r"onnxruntime .*pip install 'tunelab\[export\]'"):
        OnnxGenerator(tmp_path)
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[export\]'"):
        verify_onnx(tmp_path / "model", tmp_path)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(TunelabError, match=r"onnxscript .*pip install 'tunelab\[export\]'"):
        export_onnx(tmp_path / "model", tmp_path / "out")
