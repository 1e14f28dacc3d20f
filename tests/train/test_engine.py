"""The training engine: accumulation, methods, evaluation, outputs, NaN handling."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ALPACA_DEMO, SHARED_DATA, make_config
from tunelab.config import config_from_dict
from tunelab.data.packing import collate_packed, collate_padded
from tunelab.errors import ConfigError, TrainingError, TunelabError
from tunelab.eval.generation_eval import GenerationEvaluator
from tunelab.train.parallel import Parallel, Processes
from tunelab.train.engine import train
from tunelab.train.objectives import objective_spec
from tunelab.train.objectives.sft import SFTObjective
from tunelab.train.reporting import read_metrics
from token_examples import random_examples


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_accumulating_four_micro_batches_equals_one_big_batch(tmp_path, tiny_model, packed):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).train()
    examples = random_examples(16, model.config.vocab_size, seed=2)
    objective = SFTObjective()
    # The single-process path of the engine's loop.
    parallel = Parallel(model, objective, Processes(), torch.device("cpu"),
                        config_from_dict(make_config(tmp_path, tiny_model, ALPACA_DEMO)))

    def collate(group):
        return collate_packed(group) if packed else collate_padded(group, pad_id=0)

    def backward_window(window):
        return parallel.backward_window(window, objective.window_totals(window), nullcontext, None, {})

    loss_accumulated = backward_window([collate(examples[k : k + 4]) for k in range(0, 16, 4)])
    accumulated = gradients(model)
    model.zero_grad(set_to_none=True)
    loss_big = backward_window([collate(examples)])
    big = gradients(model)

    assert abs(float(loss_accumulated) - float(loss_big)) < 1e-5 * float(loss_big)
    assert accumulated.keys() == big.keys() and len(big) > 0
    for name in big:
        assert torch.allclose(accumulated[name], big[name], rtol=1e-5, atol=1e-7), name


def test_grad_accum_in_a_run_equals_one_big_batch(tmp_path, tiny_model):
    """Through the whole engine: 4 x batch 2 and 1 x batch 8 give the same step loss and grad norm."""
    rows = {}
    for accum, batch in ((4, 2), (1, 8)):
        config = make_config(tmp_path / f"a{accum}", tiny_model, ALPACA_DEMO,
                             data={"packing": False, "max_samples": 8}, method={"type": "lora", "dropout": 0.0},
                             train={"max_steps": None, "epochs": 1, "grad_accum": accum, "batch_size": batch})
        result = train(config_from_dict(config))
        assert result.steps == 1
        rows[accum] = read_metrics(result.output_dir / "metrics.jsonl")[0]
    assert rows[4]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
    assert rows[4]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-5)


def test_lora_sft_lowers_held_out_loss_and_final_loads_in_plain_peft(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO,
                         data={"val_ratio": 0.1, "max_length": 256},
                         method={"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
                         train={"max_steps": 30, "lr": 3e-3, "batch_tokens": 2048, "log_every": 10,
                                "eval_at_start": True})
    result = train(config_from_dict(config))
    assert result.final_metrics["eval_loss"] < result.start_metrics["eval_loss"] - 0.05

    final = result.final_dir
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert (final / "chat_template.jinja").is_file() or "chat_template" in (final / "tokenizer_config.json").read_text()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, final).eval()
    ours = result.model.eval()
    ids = result.tokenizer("Give three tips for staying healthy.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = ours(ids).logits
        actual = plain(ids).logits
    assert torch.allclose(actual, expected, atol=1e-6, rtol=1e-5)


def test_full_fine_tuning_saves_a_plain_hf_model(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "full"},
                         train={"max_steps": 3, "lr": 1e-3})
    result = train(config_from_dict(config))
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model.eval()(ids).logits, atol=1e-6)
    saved = json.loads((result.final_dir / "generation_config.json").read_text())
    end_of_turn = result.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in saved["eos_token_id"] and result.tokenizer.eos_token_id in saved["eos_token_id"]
    assert "packed" not in (result.final_dir / "config.json").read_text()


def test_freeze_trains_only_the_chosen_layers(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO,
                         method={"type": "freeze", "trainable_layers": [-1], "trainable_modules": ["mlp"]},
                         train={"max_steps": 2, "lr": 1e-2})
    result = train(config_from_dict(config))
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.mlp.") for name in changed)


def test_pretrain_on_plain_text_trains_every_token(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, SHARED_DATA / "llamafactory_demo" / "c4_demo.jsonl",
                         method={"type": "full"}, data={"max_samples": 60, "val_ratio": 0.2},
                         train={"objective": "pretrain", "max_steps": 8, "lr": 3e-3, "eval_at_start": True})
    parsed = config_from_dict(config)
    # Computed where the data is tokenized (the config keeps data.train_on as written).
    assert parsed.data.trained_tokens(objective_spec(parsed.train.objective).data) == "all"
    result = train(parsed)
    assert result.final_metrics["eval_loss"] < result.start_metrics["eval_loss"]


def test_outputs_of_a_run(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO,
                         data={"val_ratio": 0.05},
                         train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 2, "eval_every": 2})
    result = train(config_from_dict(config))
    out = result.output_dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]
    step = out / "checkpoints" / "step-4"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json",
                 "tokenizer.json"):
        assert (step / name).is_file(), name
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= row.keys()
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 4 and run["data_fingerprint"] and run["versions"]["torch"]
    assert (out / "config.yaml").is_file()

    with pytest.raises(TunelabError, match="already holds a run"):
        train(config_from_dict(config))
    train(config_from_dict({**config, "train": {**config["train"], "max_steps": 1}}), overwrite=True)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]


def test_a_run_stopped_before_its_first_checkpoint_is_not_appended_to(tmp_path):
    from tunelab.train.run_dir import RunDirectory

    config = config_from_dict(make_config(tmp_path, tmp_path / "model", ALPACA_DEMO))
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 1.0}\n')  # killed during its first steps
    with pytest.raises(TunelabError, match="already holds a run"):
        RunDirectory(config, resume=False, overwrite=False).open()
    run_dir = RunDirectory(config, resume=False, overwrite=True)
    run_dir.open()
    run_dir.close()
    assert not (out / "metrics.jsonl").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, method={"type": "full"},
                         train={"max_steps": 6, "lr": 1e30, "save_every": 1, "max_grad_norm": None,
                                "warmup_ratio": 0.0, "schedule": "constant"})
    with pytest.raises(TrainingError, match=r"became (nan|inf).* at step \d.*Last good checkpoint: .*step-\d"):
        train(config_from_dict(config))
    checkpoints = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert checkpoints
    assert not list((tmp_path / "out" / "checkpoints").glob(".tmp-*"))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] >= 1


def test_generation_metrics_are_logged_during_training(tmp_path, tiny_model):
    config = config_from_dict(make_config(
        tmp_path, tiny_model, ALPACA_DEMO, data={"val_ratio": 0.02},
        train={"max_steps": 2, "eval_every": 1},
        eval={"generate_samples": 4, "max_new_tokens": 8, "metrics": ["exact_match", "bleu", "distinct_1"]},
    ))
    result = train(config, evaluators=[GenerationEvaluator(config.eval)])
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {"eval_exact_match", "eval_bleu", "eval_distinct_1"} <= row.keys()
    with pytest.raises(ConfigError, match="unknown metric"):
        config_from_dict(make_config(tmp_path, tiny_model, ALPACA_DEMO, eval={"metrics": ["bleux"]}))
