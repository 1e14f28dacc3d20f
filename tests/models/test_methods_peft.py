"""QLoRA/8-bit bases, prefix and prompt tuning, PiSSA, NEFTune and layer-wise freezing options."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ALPACA_DEMO, make_config, write_config
from tunelab.cli import main as cli_main
from tunelab.config import ModelConfig, config_from_dict, load_config, method_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.eval.suite import EvalOptions, run_eval
from tunelab.models.adapters import count_parameters, layer_indices, linear_module_names
from tunelab.models.methods import apply_method
from tunelab.models.load import generation_stop_ids, load_for_inference, load_model
from tunelab.models.quant import quantization_config, weight_memory
from tunelab.train.engine import train
from tunelab.train.neftune import NEFTune, noise_scale
from tunelab.train.reporting import read_metrics

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
CPU = torch.device("cpu")


def train_losses(output_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir / "metrics.jsonl") if "loss" in row]


def padded_inputs(tokenizer) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, right-padded, with an attention mask."""
    encoded = tokenizer(["Give three tips for staying healthy.", "What is 2 + 3?"], return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def real_logits(model, inputs) -> torch.Tensor:
    """Logits at the real (unpadded) positions, the virtual tokens of prompt tuning dropped."""
    with torch.no_grad():
        logits = model.eval()(**inputs).logits[:, -inputs["input_ids"].shape[1]:]
    return logits[inputs["attention_mask"].bool()]


# ---------------------------------------------------------------------------------------------
# Prefix and prompt tuning


@pytest.mark.parametrize(
    "method",
    [{"type": "prefix", "num_virtual_tokens": 8, "prefix_projection": True},
     {"type": "prompt", "num_virtual_tokens": 8, "prompt_init": "text",
      "prompt_init_text": "Answer the question helpfully."}],
    ids=["prefix-projection", "prompt-text-init"],
)
def test_virtual_tokens_lower_held_out_loss_and_load_in_plain_peft(tmp_path, tiny_model, tokenizer, method, capsys):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method=method,
                         data={"val_ratio": 0.05, "max_samples": 400, "max_length": 128},
                         train={"max_steps": 15, "lr": 3e-2, "batch_size": 16, "eval_at_start": True,
                                "warmup_ratio": 0.0, "log_every": 5})
    result = train(config_from_dict(config))
    assert "data.packing off: method.type" in capsys.readouterr().err  # said, not silent
    before, after = result.start_metrics["eval_loss"], result.final_metrics["eval_loss"]
    # Measured: prefix 6.880 -> 6.804, prompt 6.881 -> 6.846 (a 2-layer random model leaves prompt
    # tuning little to steer); evaluation is deterministic, so these margins are not noise.
    assert after < before - {"prefix": 0.05, "prompt": 0.02}[method["type"]], (before, after)

    saved = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method["type"]]
    assert saved["num_virtual_tokens"] == 8
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, result.final_dir)
    inputs = padded_inputs(tokenizer)
    assert torch.allclose(real_logits(plain, inputs), real_logits(result.model, inputs), atol=1e-5)


def test_prompt_tuning_starts_from_the_text_or_vocabulary_embeddings(tiny_model, tokenizer):
    text = "What is 2 + 3?"
    ids = tokenizer(text)["input_ids"]
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model),
                         method_config(type="prompt", num_virtual_tokens=len(ids) + 2, prompt_init="text",
                                      prompt_init_text=text))
    vocabulary = model.get_input_embeddings().weight.detach()
    start = model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(start, vocabulary[ids + ids[:2]])  # the text's tokens, repeated to the length
    torch.manual_seed(0)
    sampled = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model),
                           method_config(type="prompt", num_virtual_tokens=5, prompt_init="vocab"))
    rows = sampled.prompt_encoder["default"].embedding.weight.detach()
    assert all((vocabulary == row).all(dim=1).any() for row in rows)  # each one a real token's embedding


@pytest.mark.parametrize(
    "method, extra_train",
    [({"type": "prefix", "num_virtual_tokens": 4, "prefix_projection": True}, {}),
     ({"type": "prompt", "num_virtual_tokens": 4}, {}),
     ({"type": "lora", "rank": 4, "init": "pissa", "pissa_niter": 2}, {}),
     ({"type": "lora", "rank": 4}, {"neftune_alpha": 5.0}),
     pytest.param({"type": "qlora", "rank": 4}, {}, marks=needs_bnb)],
    ids=["prefix-projection", "prompt", "pissa", "lora-neftune", "qlora"],
)
def test_resume_from_a_checkpoint_reproduces_the_run(tmp_path, tiny_model, method, extra_train):
    """A run resumed from its step-2 checkpoint (fresh model, state from disk) gives the same losses."""
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method=method, data={"max_samples": 64},
                         train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 3, "batch_size": 4,
                                "lr": 1e-2, **extra_train})
    first = train(config_from_dict(config))
    uninterrupted = train_losses(first.output_dir)
    shutil.rmtree(first.output_dir / "checkpoints" / "step-4")  # as if killed after step 3
    shutil.rmtree(first.final_dir)
    resumed = train(config_from_dict(config), resume=True)
    assert resumed.steps == 4 and len(uninterrupted) == 4
    assert train_losses(resumed.output_dir) == uninterrupted  # exact on CPU fp32
    if method.get("prefix_projection"):  # the MLP that makes the prefix is in the checkpoint too
        assert (first.output_dir / "checkpoints" / "step-2" / "prompt_encoder.safetensors").is_file()


def test_tunelab_eval_on_a_prompt_tuning_adapter_uses_one_sequence_per_row(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "prompt", "num_virtual_tokens": 4},
                         data={"max_samples": 32}, train={"max_steps": 2, "batch_size": 8, "lr": 3e-2})
    result = train(config_from_dict(config))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in json.loads(ALPACA_DEMO.read_text())[:6]))

    # The command's own code, in this process (a subprocess would spend ~10 s importing).
    exit_code = cli_main(["eval", "--model", str(result.final_dir), "--data", str(eval_file), "--out",
                          str(tmp_path / "eval"), "--metrics", "loss,perplexity,exact_match", "--max-new-tokens", "4",
                          "--device", "cpu"])
    assert exit_code == 0
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))

    # Asked to pack (the default), evaluation still gives each sequence its own row: a packed row
    # would show the virtual tokens to its first sequence only.
    model, tokenizer = load_for_inference(str(result.final_dir), device=CPU)
    stop_ids = generation_stop_ids(model.generation_config, tokenizer)
    losses = [
        run_eval(model, tokenizer, [str(eval_file)], str(tmp_path / f"packing-{packing}"),
                 EvalOptions(metrics=["loss"], packing=packing), stop_ids)["metrics"]["loss"]
        for packing in (True, False)
    ]
    assert losses[0] == losses[1] == pytest.approx(metrics["loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# QLoRA and 8-bit


@needs_bnb
def test_qlora_trains_on_a_4bit_base_and_its_adapter_loads_on_full_precision_bases(tmp_path, tiny_model, tokenizer,
                                                                                     capsys):
    import bitsandbytes as bnb

    config = config_from_dict(make_config(
        tmp_path, tiny_model, ALPACA_DEMO, method={"type": "qlora", "rank": 8, "alpha": 16},
        data={"val_ratio": 0.05, "max_samples": 400},
        train={"max_steps": 12, "lr": 1e-2, "eval_at_start": True, "warmup_ratio": 0.0, "log_every": 4}))
    # auto resolved where it is used (the config keeps what was written), and recorded in run.json.
    assert config.model.quantization == "auto" and config.base_quantization == "4bit"
    result = train(config)
    assert "4bit base, weights take" in capsys.readouterr().err
    layer = result.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    quant_state = layer.base_layer.weight.quant_state
    assert quant_state.quant_type == "nf4" and quant_state.nested  # NF4, double quantization
    assert result.final_metrics["eval_loss"] < result.start_metrics["eval_loss"] - 0.05
    assert json.loads((result.output_dir / "run.json").read_text())["quantization"] == "4bit"

    trained = load_file(result.final_dir / "adapter_model.safetensors")
    assert len(trained) == 2 * 7 * 2  # A and B of 7 linear layers in 2 decoder layers
    inputs = padded_inputs(tokenizer)
    for dtype in (torch.float32, torch.bfloat16):
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
        base_logits = real_logits(base, inputs)
        plain = PeftModel.from_pretrained(base, result.final_dir)
        adapted = real_logits(plain, inputs)
        assert torch.isfinite(adapted).all()
        assert (adapted - base_logits).abs().max() > 0.05  # the adapter changes the model
    # On the full-precision base the adapter gives nearly what it gave on the 4-bit base.
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain_fp32 = real_logits(PeftModel.from_pretrained(base, result.final_dir), inputs)
    qlora_logits = real_logits(result.model, inputs)
    assert (plain_fp32 - qlora_logits).abs().mean() < 0.1 * qlora_logits.abs().mean()


@needs_bnb
def test_8bit_base_trains_lora(tmp_path, tiny_model):
    import bitsandbytes as bnb

    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "lora", "rank": 4},
                         data={"max_samples": 32}, train={"max_steps": 2})
    config["model"]["quantization"] = "8bit"
    result = train(config_from_dict(config))
    layer = result.model.get_base_model().model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt)
    assert all(math.isfinite(loss) for loss in train_losses(result.output_dir))


@needs_bnb
def test_4bit_weight_memory_and_parameter_count(tiny_model):
    full = load_model(ModelConfig(path=str(tiny_model)), torch.float32, CPU)
    quantized = load_model(ModelConfig(path=str(tiny_model), quantization="4bit", quant_compute_dtype="float32"),
                           torch.float32, CPU)
    assert count_parameters(quantized).total == count_parameters(full).total  # packed 4-bit counted unpacked
    linear = sum(m.weight.numel() for m in full.model.layers.modules() if isinstance(m, torch.nn.Linear))
    other = sum(p.numel() * 4 for n, p in full.named_parameters() if ".self_attn." not in n and ".mlp." not in n)
    memory = weight_memory(quantized)
    assert memory.bf16_bytes == 2 * count_parameters(full).total
    # NF4: half a byte per weight, plus the absmax constants (double-quantized: ~0.016 byte/weight)
    bytes_per_linear_weight = (memory.actual_bytes - other) / linear
    assert 0.5 < bytes_per_linear_weight < 0.53, bytes_per_linear_weight


def test_missing_bitsandbytes_names_the_extra_to_install(monkeypatch, tiny_model):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[qlora\]'"):
        quantization_config(ModelConfig(path=str(tiny_model), quantization="4bit"), CPU)


# ---------------------------------------------------------------------------------------------
# PiSSA


def test_pissa_starts_at_the_base_model_and_saves_a_lora_of_the_original_base(tmp_path, tiny_model, tokenizer):
    inputs = padded_inputs(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base_logits = real_logits(base, inputs)
    pissa = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                         method_config(type="lora", rank=4, init="pissa", pissa_niter=None))
    assert torch.allclose(real_logits(pissa, inputs), base_logits, atol=1e-5)  # W = W_res + A B exactly
    lora_b = [p for n, p in pissa.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # unlike default LoRA, B starts non-zero

    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "lora", "rank": 4, "init": "pissa"},
                         data={"max_samples": 64}, train={"max_steps": 4, "lr": 1e-2})
    result = train(config_from_dict(config))
    saved = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # [A | A0], [B | -B0]
    trained = real_logits(result.model, inputs)
    assert (trained - base_logits).abs().max() > 1e-2  # it trained
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                            result.final_dir)
    assert torch.allclose(real_logits(on_original, inputs), trained, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# NEFTune


def test_neftune_scale_uses_each_sequence_length():
    packed = noise_scale(5.0, torch.Size([1, 8, 4]), [[3, 5]], None, CPU).squeeze(-1)
    assert torch.allclose(packed, torch.tensor([[5 / math.sqrt(12)] * 3 + [5 / math.sqrt(20)] * 5]))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    padded = noise_scale(5.0, torch.Size([2, 4, 4]), None, mask, CPU).squeeze(-1)
    assert torch.allclose(padded, torch.tensor([[5 / math.sqrt(12)] * 3 + [0.0], [5 / math.sqrt(16)] * 4]))
    plain = noise_scale(5.0, torch.Size([1, 4, 4]), None, None, CPU)
    assert torch.allclose(plain, torch.full((1, 4, 1), 5 / math.sqrt(16)))


def test_neftune_noise_in_training_only_within_its_bounds(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    seen: list[torch.Tensor] = []  # what the first decoder layer receives: the (noisy) embeddings

    def record(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    ids = torch.randint(1, 900, (1, 40), generator=torch.Generator().manual_seed(0))
    clean = model.get_input_embeddings().weight[ids].detach()
    neftune = NEFTune(model, alpha=10.0)
    torch.manual_seed(0)
    model.train()(input_ids=ids, position_ids=torch.tensor([list(range(10)) + list(range(30))]),
                  packed_seq_lens=[[10, 30]], use_cache=False)
    noise = (seen[-1] - clean)[0]
    dim = clean.shape[-1]
    for piece, length in ((noise[:10], 10), (noise[10:], 30)):
        bound = 10.0 / math.sqrt(length * dim)
        assert piece.abs().max() <= bound * (1 + 1e-5)
        assert piece.abs().max() > 0.95 * bound  # uniform noise reaches near its bound
    model.eval()(input_ids=ids)
    assert torch.equal(seen[-1], clean)  # evaluation sees clean embeddings
    neftune.remove()
    model.train()(input_ids=ids)
    assert torch.equal(seen[-1], clean)  # removed: no hook left


def test_neftune_changes_training_losses_not_evaluation(tmp_path, tiny_model):
    rows = {}
    for alpha in (None, 5.0):
        config = make_config(tmp_path / str(alpha), tiny_model, ALPACA_DEMO, data={"max_samples": 64, "val_ratio": 0.1},
                             train={"max_steps": 2, "eval_at_start": True, "neftune_alpha": alpha})
        result = train(config_from_dict(config))
        rows[alpha] = (result.start_metrics["eval_loss"], train_losses(result.output_dir))
    assert rows[5.0][0] == rows[None][0]
    assert rows[5.0][1][0] != rows[None][1][0]
    with pytest.raises(ConfigError, match="neftune_alpha"):
        config_from_dict(make_config(tmp_path, tiny_model, ALPACA_DEMO, train={"objective": "dpo", "neftune_alpha": 5}))


# ---------------------------------------------------------------------------------------------
# Layer-wise freezing


def test_layer_choices():
    assert layer_indices(2, 8) == [6, 7]
    assert layer_indices([0, -1, -1], 8) == [0, 7]
    assert layer_indices("-3:", 8) == [5, 6, 7]
    assert layer_indices(":2", 8) == [0, 1]
    assert layer_indices("2:-4", 8) == [2, 3]
    for bad in (9, 0, [8], [], "5:2"):
        with pytest.raises(TunelabError, match="trainable_layers"):
            layer_indices(bad, 8)
    with pytest.raises(ConfigError, match="not a layer slice"):
        config_from_dict({"model": {"path": "m"}, "data": {"train": "d"}, "output_dir": "o",
                          "method": {"type": "freeze", "trainable_layers": "last"}})


def test_lora_on_chosen_layers_only(tiny_model):
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model),
                         method_config(type="lora", rank=4, trainable_layers=[-1]))
    adapted = [name for name, module in model.named_modules() if name.endswith("lora_A")]
    assert adapted and all(".layers.1." in name for name in adapted)
    kinds = {name.split(".")[-2] for name in adapted}
    assert kinds == set(linear_module_names(AutoModelForCausalLM.from_pretrained(tiny_model))) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_full_fine_tuning_with_frozen_embeddings(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "full", "train_embeddings": False},
                         data={"max_samples": 32}, train={"max_steps": 2, "lr": 1e-2})
    result = train(config_from_dict(config))
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.embed_tokens.weight" not in changed
    assert "lm_head.weight" not in changed
    assert {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"} <= changed


def test_freeze_with_a_layer_slice_and_default(tiny_model):
    sliced = AutoModelForCausalLM.from_pretrained(tiny_model)
    apply_method(sliced, method_config(type="freeze", trainable_layers="-1:", train_embeddings=True))
    trainable = {n for n, p in sliced.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.layers.1.") for n in trainable)
    assert not any(n.startswith("model.layers.0.") for n in trainable)
    assert "model.embed_tokens.weight" in trainable
    default = AutoModelForCausalLM.from_pretrained(tiny_model)
    apply_method(default, method_config(type="freeze"))  # the last 2 layers: both layers of the tiny model
    assert {n for n, p in default.named_parameters() if p.requires_grad} == {
        n for n, _ in default.named_parameters() if n.startswith("model.layers.")}


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("sections, message", [
    ({"method": {"type": "qlora"}, "model": {"quantization": "none"}}, "qlora needs a quantized base"),
    ({"method": {"type": "full"}, "model": {"quantization": "4bit"}}, "cannot be trained by method full"),
    ({"method": {"type": "qlora", "init": "pissa"}}, "pissa with a quantized base"),
    ({"method": {"type": "lora", "trainable_modules": ["mlp"]}}, "does not use: trainable_modules"),
    ({"method": {"type": "prefix", "rank": 8, "prompt_init": "text"}}, "does not use: prompt_init"),
    ({"method": {"type": "prompt", "prompt_init": "text"}}, "prompt_init text and method.prompt_init_text"),
    ({"method": {"type": "prompt"}, "train": {"objective": "dpo"}}, "sft or pretrain only"),
])
def test_combinations_that_cannot_work_are_config_errors(tmp_path, sections, message):
    config = {"model": {"path": "m"}, "data": {"train": "d"}, "output_dir": "o"}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = write_config(tmp_path, config)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
