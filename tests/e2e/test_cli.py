"""The tunelab command: help, env, tiny models, data preview, tokenization cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ALPACA_DEMO, ARITHMETIC_TRAIN, SHAREGPT_DEMO, make_config, run_cli, write_config
from tunelab.config import ModelConfig, config_from_dict
from tunelab.data.tokenize import prepare_data
from tunelab.errors import TunelabError
from tunelab.models.load import load_model, load_tokenizer, stop_token_ids


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("env", "config", "models", "data", "train"):
        assert command in result.stdout


def test_env_prints_versions_and_device():
    result = run_cli("env")
    assert result.returncode == 0
    for name in ("torch", "transformers", "peft", "device", "precision"):
        assert name in result.stdout


def test_models_tiny_writes_a_plain_hf_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 50 + "numbers 123 456\n")
    result = run_cli("models", "tiny", str(tmp_path / "m"), "--hidden", "32", "--layers", "2", "--heads", "2",
                     "--vocab", "400", "--tokenizer-corpus", str(corpus))
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) <= model.config.vocab_size
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("the cat 42")["input_ids"]) == "the cat 42"
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


def test_models_tiny_rejects_bad_shapes(tmp_path):
    result = run_cli("models", "tiny", str(tmp_path / "m"), "--hidden", "30", "--heads", "4")
    assert result.returncode == 2 and "divisible" in result.stderr and "Traceback" not in result.stderr


def test_data_preview_marks_trained_tokens(tmp_path, tiny_model):
    config = write_config(tmp_path, make_config(tmp_path, tiny_model, SHAREGPT_DEMO))
    result = run_cli("data", "preview", str(config), "-n", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[[I am Vicuna, a language model trained by researchers" in out  # an assistant turn, trained
    assert "[[Who are you?" not in out and "Who are you?" in out  # a user turn, masked
    assert "<|im_end|>]]" in out
    assert "lengths min" in out and "tokens" in out


def test_tokenized_data_is_cached_by_fingerprint(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    stops = stop_token_ids(str(tiny_model), tokenizer)
    config = config_from_dict(make_config(tmp_path, tiny_model, ALPACA_DEMO, data={"val_ratio": 0.1,
                                                                                    "cache_dir": str(tmp_path / "c")}))
    first = prepare_data(config.data, "conversations", 0, tokenizer, stops)
    second = prepare_data(config.data, "conversations", 0, tokenizer, stops)
    assert not first.train_report.from_cache and second.train_report.from_cache
    assert second.train["input_ids"] == first.train["input_ids"] and second.train["labels"] == first.train["labels"]
    assert second.eval_records == first.eval_records
    assert second.train_report.truncated == first.train_report.truncated > 0
    # Anything that changes the tokens changes the fingerprint.
    changed = config.data.model_copy(update={"max_length": 128})
    assert not prepare_data(changed, "conversations", 0, tokenizer, stops).train_report.from_cache
    assert not prepare_data(config.data, "conversations", 1, tokenizer, stops).train_report.from_cache
    data_copy = tmp_path / "alpaca.json"
    records = json.loads(ALPACA_DEMO.read_text())
    records[0]["output"] += " (edited)"
    data_copy.write_text(json.dumps(records))
    edited = config.data.model_copy(update={"train": [str(data_copy)]})
    assert not prepare_data(edited, "conversations", 0, tokenizer, stops).train_report.from_cache


def test_missing_model_directory_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, make_config(tmp_path, tmp_path / "no" / "such-model", ALPACA_DEMO))
    result = run_cli("train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"model.path {tmp_path / 'no' / 'such-model'}: no such model directory" in result.stderr


def test_pickled_weights_are_never_loaded(tmp_path, tiny_model):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    state = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(TunelabError, match="no safetensors weights found; tunelab never loads pickled"):
        load_model(ModelConfig(path=str(pickled)), torch.float32, torch.device("cpu"))


def test_multi_process_tokenization_gives_the_same_data(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    stops = stop_token_ids(str(tiny_model), tokenizer)
    results = {}
    for procs in (1, 2):
        config = config_from_dict(make_config(tmp_path, tiny_model, ARITHMETIC_TRAIN,
                                              data={"num_proc": procs, "cache_dir": str(tmp_path / f"c{procs}")}))
        results[procs] = prepare_data(config.data, "conversations", 0, tokenizer, stops)
    assert len(results[2].train) == 4000
    assert results[2].train["input_ids"] == results[1].train["input_ids"]
    assert results[2].train["labels"] == results[1].train["labels"]
