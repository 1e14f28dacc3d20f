"""LoRA variants (rsLoRA, DoRA, LoRA+, chosen targets), optimizer groups, schedules, checkpointing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import ALPACA_DEMO, make_config
from tunelab.config import TrainConfig, config_from_dict, method_config
from tunelab.models.methods import apply_method
from tunelab.train.engine import train
from tunelab.train.optim import lr_factor, parameter_groups
from tunelab.train.reporting import read_metrics


@pytest.mark.parametrize("variant", [{"use_rslora": True}, {"use_dora": True}], ids=["rslora", "dora"])
def test_lora_variants_train_save_and_reload(tmp_path, tiny_model, variant):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO,
                         method={"type": "lora", "rank": 4, "alpha": 8, **variant}, train={"max_steps": 3})
    result = train(config_from_dict(config))
    saved = json.loads((result.final_dir / "adapter_config.json").read_text())
    for key, value in variant.items():
        assert saved[key] is value
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, result.final_dir).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, result.model.eval()(ids).logits, atol=1e-6)


def test_target_modules_choose_the_adapted_layers(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = apply_method(model, method_config(type="lora", target_modules=["q_proj", "v_proj"]))
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_lora_plus_gives_b_matrices_a_larger_learning_rate(tiny_model):
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model), method_config(type="lora", rank=4))
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.1, lora_plus_ratio=16)
    by_lr = {group["lr"]: group for group in groups}
    assert set(by_lr) == {1e-4, 1.6e-3}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in by_lr[1.6e-3]["params"])
    assert all("lora_A" in names[id(p)] for p in by_lr[1e-4]["params"])


def test_no_weight_decay_on_biases_and_norms(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for parameter in group["params"]:
            is_norm = "norm" in names[id(parameter)]
            assert (group["weight_decay"] == 0.0) == is_norm, names[id(parameter)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_learning_rate_schedules():
    assert [lr_factor(s, 10, 2, "constant", 0.0) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine", 0.0) == 1.0
    assert lr_factor(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "linear", 0.0) == pytest.approx(1 - 9 / 10)
    assert math.isclose(TrainConfig().warmup_ratio, 0.03)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model):
    losses = {}
    for checkpointing in (False, True):
        config = make_config(tmp_path / str(checkpointing), tiny_model, ALPACA_DEMO, method={"type": "full"},
                             train={"max_steps": 3, "gradient_checkpointing": checkpointing})
        result = train(config_from_dict(config))
        losses[checkpointing] = [r["loss"] for r in read_metrics(result.output_dir / "metrics.jsonl")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_tensorboard_event_files(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, train={"max_steps": 2, "tensorboard": True})
    result = train(config_from_dict(config))
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))
