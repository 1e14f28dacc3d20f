"""The chunked loss: the same loss and gradients as the full logits, and it switches itself off where it cannot run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ALPACA_DEMO, REPO, make_config
from tunelab.config import TunelabConfig
from tunelab.data.packing import collate_packed, collate_padded
from tunelab.models.attention import register_packed_sdpa
from tunelab.train.engine import train
from tunelab.models.logprobs import chunked_loss_supported
from tunelab.train.objectives.sft import chunked_causal_lm_loss
from tunelab.models.logprobs import sequence_logps
from tunelab.train.objectives.sft import causal_lm_loss
from tunelab.train.reporting import read_metrics

ARITHMETIC_PREFS = REPO / "examples" / "data" / "arithmetic_prefs_train.jsonl"


def examples() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((19, 6), (11, 3), (25, 9)):
        ids = torch.randint(3, 500, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


@pytest.mark.parametrize("chunk_tokens", [7, 4096], ids=["several-chunks", "one-chunk"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny_model, packed, chunk_tokens):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=register_packed_sdpa())
    batch = collate_packed(examples()) if packed else collate_padded(examples(), pad_id=0)
    full = causal_lm_loss(model, batch)
    full.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    chunked = chunked_causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)  # 7: a short last chunk too
    chunked.backward()
    assert abs(chunked.item() - full.item()) < 1e-4 * full.item()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], atol=1e-6, rtol=1e-4), name


def test_training_with_the_chunked_loss_follows_the_same_loss_curve(tmp_path, tiny_model, capsys):
    curves = {}
    for setting in ("off", "on"):
        config = make_config(tmp_path / setting, tiny_model, ALPACA_DEMO, data={"max_samples": 120},
                             train={"max_steps": 10, "chunked_loss": setting, "loss_chunk_tokens": 64, "lr": 2e-3})
        result = train(TunelabConfig.model_validate(config))
        curves[setting] = [row["loss"] for row in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in row]
        assert ("loss: chunked, 64 positions at a time" in capsys.readouterr().err) == (setting == "on")
    difference = max(abs(a - b) for a, b in zip(curves["on"], curves["off"]))
    assert len(curves["on"]) == 10 and difference < 1e-4, difference


def test_chunked_loss_switches_itself_off_for_models_whose_logits_are_not_the_head(tmp_path, tiny_model, capsys,
                                                                                 monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert chunked_loss_supported(model, torch.device("cpu"))
    plain_forward = model.forward
    model.forward = lambda *args, **kwargs: plain_forward(*args, **kwargs).__class__(
        logits=plain_forward(*args, **kwargs).logits * 30.0)  # a model that scales its logits (Cohere-style)
    assert not chunked_loss_supported(model, torch.device("cpu"))

    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "prompt", "num_virtual_tokens": 4},
                         data={"max_samples": 40, "packing": False}, train={"max_steps": 1, "chunked_loss": "on"})
    train(TunelabConfig.model_validate(config))
    assert capsys.readouterr().err.count("train.chunked_loss off:") == 1


def test_yaml_on_and_off_mean_the_settings(tmp_path, tiny_model):
    for value, expected in ((True, "on"), (False, "off"), ("auto", "auto")):
        config = make_config(tmp_path, tiny_model, ALPACA_DEMO, train={"chunked_loss": value})
        assert TunelabConfig.model_validate(config).train.chunked_loss == expected


@pytest.mark.parametrize("chunk_tokens", [5, 4096], ids=["several-chunks", "one-chunk"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_chunked_sequence_log_probs_equal_full_logits_and_gradients(tiny_model, packed, chunk_tokens):
    """What DPO, SimPO, ORPO and KTO score: per-sequence log-probs, chunk by chunk or from full logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=register_packed_sdpa())
    batch = collate_packed(examples()) if packed else collate_padded(examples(), pad_id=0)
    weights = torch.tensor([0.5, -1.0, 2.0])  # a loss that weighs the sequences differently
    full, full_counts = sequence_logps(model, batch)
    (full * weights).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    chunked, counts = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
    (chunked * weights).sum().backward()
    assert torch.equal(counts, full_counts) and counts.tolist() == [13, 8, 16]
    assert torch.allclose(chunked, full, atol=1e-4, rtol=1e-5)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], atol=1e-6, rtol=1e-4), name


def test_dpo_with_the_chunked_loss_follows_the_same_loss_curve(tmp_path, tiny_model, capsys):
    curves = {}
    for setting in ("off", "on"):
        config = make_config(tmp_path / setting, tiny_model, ARITHMETIC_PREFS,
                             train={"objective": "dpo", "max_steps": 5, "chunked_loss": setting,
                                    "loss_chunk_tokens": 32, "lr": 5e-3, "batch_tokens": 512})
        result = train(TunelabConfig.model_validate(config))
        curves[setting] = [row["loss"] for row in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in row]
        assert ("loss: chunked, 32 positions at a time" in capsys.readouterr().err) == (setting == "on")
    difference = max(abs(a - b) for a, b in zip(curves["on"], curves["off"]))
    assert len(curves["on"]) == 5 and curves["on"][-1] < curves["on"][0] and difference < 1e-4, curves
