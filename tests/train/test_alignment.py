"""Offline alignment: preference data, reward model, DPO/IPO/hinge, SimPO, ORPO and KTO on the engine.

Loss values are checked against TRL's own code (the test oracle; tunelab never imports trl) and
against float64 formulas from the papers; learning is checked on a preference set a tiny model
can learn; the reward model's output is loaded with plain transformers + PEFT.
"""

from __future__ import annotations

import gc
import json
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ARITHMETIC_TEST, ARITHMETIC_TRAIN, SHARED_DATA, make_config, run_cli, write_config
from tunelab.config import TunelabConfig
from tunelab.data.packing import collate_packed, collate_padded
from tunelab.data.readers import load_feedback, load_preferences
from tunelab.train.engine import train
from tunelab.train.objectives.kto import kl_estimate, kto_losses
from tunelab.train.objectives.preference import dpo_losses, orpo_log_odds_ratio, simpo_losses
from tunelab.models.logprobs import sequence_logps

DPO_DEMO = SHARED_DATA / "llamafactory_demo" / "dpo_en_demo.json"
KTO_DEMO = SHARED_DATA / "llamafactory_demo" / "kto_en_demo.json"
V1_DPO_DEMO = SHARED_DATA / "llamafactory_demo" / "v1_dpo_demo.jsonl"
HH_RLHF = SHARED_DATA / "hh_rlhf" / "harmless-base-test.jsonl.gz"
REFUSALS = ["I am not sure.", "I cannot answer that.", "Sorry, no idea.", "That is hard to say."]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def preference_set(path: Path, source: Path, limit: int, seed: int) -> Path:
    """A learnable preference set: a worked answer is preferred over a refusal."""
    rng = random.Random(seed)
    rows = []
    for line in source.read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "chosen": [messages[-1]],
                     "rejected": [{"role": "assistant", "content": rng.choice(REFUSALS)}]})
    return write_jsonl(path, rows)


# ---------------------------------------------------------------------------------------------
# Data


def test_every_preference_layout_reads_into_prompt_chosen_rejected():
    pairs, report = load_preferences([str(DPO_DEMO)])
    assert report.kept == 300 and pairs[0].prompt[-1]["role"] == "user" and pairs[0].chosen[0]["role"] == "assistant"
    v1, _ = load_preferences([str(V1_DPO_DEMO)])  # chosen_messages/rejected_messages, split at the common prefix
    assert [m["role"] for m in v1[0].prompt] == ["system", "user"] and v1[0].chosen != v1[0].rejected
    hh, hh_report = load_preferences([str(HH_RLHF)], on_error="skip", limit=200)
    assert len(hh) >= 190 and all(p.prompt[-1]["role"] == "user" for p in hh)
    assert all(p.chosen[0]["role"] == "assistant" and p.chosen != p.rejected for p in hh)
    feedback, _ = load_feedback([str(KTO_DEMO)])
    assert len(feedback) == 300 and {f.label for f in feedback} == {True, False}


def test_bad_pairs_are_counted_or_named_never_a_crash(tmp_path, tiny_model):
    long_prompt = " ".join(["word"] * 400)
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": ""},  # empty rejected
        {"prompt": "What is 3+3?", "chosen": "6", "rejected": "6"},  # identical
        {"prompt": long_prompt, "chosen": "yes", "rejected": "no"},  # longer than max_length
        *[{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": "no idea"} for i in range(12)],
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = make_config(tmp_path, tiny_model, data, data={"max_length": 64, "val_ratio": 0},
                         train={"objective": "dpo", "max_steps": 1, "batch_tokens": 256})
    failed = run_cli("train", str(write_config(tmp_path, config)))
    assert failed.returncode == 2 and "pairs.jsonl:1: 'rejected' is empty" in failed.stderr
    assert "Traceback" not in failed.stderr

    config["data"]["on_error"] = "skip"
    config["output_dir"] = str(tmp_path / "skip")
    skipped = run_cli("train", str(write_config(tmp_path, config)))
    assert skipped.returncode == 0, skipped.stderr
    assert "1 skipped: 'rejected' is empty (first at" in skipped.stderr
    assert "1 skipped: 'chosen' and 'rejected' are identical" in skipped.stderr
    assert "1 skipped: the prompt is longer than data.max_length (64 tokens)" in skipped.stderr


def test_pair_rows_label_only_the_continuation(tokenizer):
    from tunelab.data.pair_tokenize import PairTokenizer, preference_rows
    from tunelab.data.preferences import Preference
    from tunelab.data.templates import IGNORE_INDEX, resolve_template

    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "sum 2 2"}]
    record = Preference(prompt, [{"role": "assistant", "content": "four"}], [{"role": "assistant", "content": "five"}])
    template = resolve_template(tokenizer, "auto")
    fn = PairTokenizer(tokenizer, template, 256, "truncate", {tokenizer.eos_token_id})
    rows = preference_rows([record])
    out = fn({key: [row[key] for row in rows] for key in rows[0]})
    for ids, labels in ((out["input_ids"][0], out["labels"][0]), (out["pair_ids"][0], out["pair_labels"][0])):
        trained_ids = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        trained = tokenizer.decode(trained_ids)
        assert "hello" not in trained and trained.strip().startswith(("four", "five"))
        assert trained_ids[-1] == tokenizer.eos_token_id  # the answer ends and that end is trained


# ---------------------------------------------------------------------------------------------
# Loss values against TRL (the oracle) and float64 formulas


def trl_self(**attributes) -> SimpleNamespace:
    """A stand-in ``self`` with what TRL's ``_compute_loss`` reads (metrics are collected and ignored)."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    metrics = defaultdict(lambda: defaultdict(list))
    return SimpleNamespace(accelerator=accelerator, _metrics=metrics, aux_loss_enabled=False, _total_train_tokens=0,
                           _tp_size=1, **attributes)


def stub_model(per_token_logps: torch.Tensor):
    """A model whose forward returns the given per-token log-probs (what TRL's fused head computes)."""
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros_like(per_token_logps),
                              mean_logits=torch.zeros_like(per_token_logps),
                              is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool))
    model = lambda **kwargs: outputs  # noqa: E731
    model.training = True
    return model


def random_completions(pairs: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``[2*pairs, width-1]`` (chosen rows first) and a completion mask ``[2*pairs, width]``."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):
        start = int(torch.randint(2, width // 2, (1,), generator=generator))
        end = int(torch.randint(start + 1, width + 1, (1,), generator=generator))
        mask[row, start:end] = 1
    logps = -torch.rand(2 * pairs, width - 1, generator=generator) * 3 * mask[:, 1:]
    return logps, mask


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_equal_trl(loss_type):
    from trl.trainer.dpo_trainer import DPOTrainer

    logps, mask = random_completions(pairs=6, width=24, seed=1)
    ref_logps = logps.sum(1) + torch.randn(12, generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_logps[:6], "ref_rejected_logps": ref_logps[6:]}
    beta = 0.3
    oracle_self = trl_self(model=stub_model(logps), beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           use_weighting=False, label_smoothing=0.0)
    expected = DPOTrainer._compute_loss(oracle_self, oracle_self.model, inputs, return_outputs=False)

    sums, counts = logps.sum(1), mask[:, 1:].sum(1)
    ours = dpo_losses(sums[:6], sums[6:], ref_logps[:6], ref_logps[6:], counts[:6], counts[6:], beta, loss_type).mean()
    assert abs(float(ours) - float(expected)) < 1e-5


def test_kto_loss_equals_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    logps, mask = random_completions(pairs=4, width=20, seed=3)  # 8 records
    generator = torch.Generator().manual_seed(4)
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    ref = logps.sum(1) + torch.randn(8, generator=generator) * 0.5
    kl_policy, kl_ref = torch.randn(8, generator=generator) - 5, torch.randn(8, generator=generator) - 5.5
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": kl_ref}
    oracle_self = trl_self(model=stub_model(logps), beta=0.2, loss_type="kto", calculate_KL=True,
                           precompute_ref_logps=True, desirable_weight=1.3, undesirable_weight=0.7,
                           _compute_kl_logps=lambda model, batch: kl_policy)
    expected = KTOTrainer._compute_loss(oracle_self, oracle_self.model, inputs, return_outputs=False)
    kl = kl_estimate(kl_policy, kl_ref)
    ours = kto_losses(logps.sum(1), ref, kl, labels, 0.2, 1.3, 0.7).mean()
    assert abs(float(ours) - float(expected)) < 1e-5


def test_simpo_and_orpo_equal_trl_experimental():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    generator = torch.Generator().manual_seed(5)
    pc, pr = -torch.rand(8, generator=generator) * 40, -torch.rand(8, generator=generator) * 40
    nc, nr = torch.randint(5, 30, (8,), generator=generator), torch.randint(5, 30, (8,), generator=generator)
    mean_c, mean_r = pc / nc, pr / nr  # TRL's CPO (SimPO) and ORPO take length-averaged log-probs
    for beta, gamma, eps in ((2.0, 0.7, 0.0), (2.5, 0.5, 0.1)):
        cpo_self = trl_self(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps)
        expected, _, _ = CPOTrainer.cpo_loss(cpo_self, mean_c, mean_r)
        assert torch.allclose(simpo_losses(pc, pr, nc, nr, beta, gamma, eps), expected, atol=1e-5)
    orpo_self = trl_self(beta=0.25)
    trl_terms, _, _, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(orpo_self, mean_c, mean_r)
    log_odds = orpo_log_odds_ratio(pc, pr, nc, nr)
    assert abs(float(log_odds.mean()) - float(trl_log_odds)) < 1e-5
    # TRL's loss is nll - mean(beta * logsigmoid(log_odds)); ours adds -beta * logsigmoid(log_odds) per pair.
    assert torch.allclose(-0.25 * torch.nn.functional.logsigmoid(log_odds), -trl_terms, atol=1e-5)


def test_conservative_dpo_equals_the_paper_in_float64():
    generator = torch.Generator().manual_seed(6)
    pc, pr = -torch.rand(8, generator=generator) * 40, -torch.rand(8, generator=generator) * 40
    rc, rr = pc + torch.randn(8, generator=generator), pr + torch.randn(8, generator=generator)
    counts = torch.full((8,), 10)
    d = lambda x: x.double()  # noqa: E731
    logsig = torch.nn.functional.logsigmoid
    beta, eps = 0.5, 0.1
    delta = beta * ((d(pc) - d(rc)) - (d(pr) - d(rr)))
    cdpo = -(1 - eps) * logsig(delta) - eps * logsig(-delta)
    ours = dpo_losses(pc, pr, rc, rr, counts, counts, beta, "sigmoid", label_smoothing=eps)
    assert torch.allclose(ours.double(), cdpo, atol=1e-5)


def test_sequence_logps_packed_equal_padded_equal_direct(tiny_model):
    from transformers import AutoModelForCausalLM

    from tunelab.models.attention import register_packed_sdpa

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=register_packed_sdpa()).eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((9, 4), (6, 2), (12, 7)):
        ids = torch.randint(3, 500, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    with torch.no_grad():
        packed, packed_counts = sequence_logps(model, collate_packed(examples))
        padded, padded_counts = sequence_logps(model, collate_padded(examples, pad_id=0))
        direct = []
        for example in examples:
            logits = model(torch.tensor([example["input_ids"]])).logits[0].log_softmax(-1)
            direct.append(sum(float(logits[t - 1, tok]) for t, tok in enumerate(example["labels"]) if tok != -100))
    assert torch.allclose(packed, torch.tensor(direct), atol=1e-4)
    assert torch.allclose(padded, torch.tensor(direct), atol=1e-4)
    assert packed_counts.tolist() == padded_counts.tolist() == [5, 4, 5]


# ---------------------------------------------------------------------------------------------
# Training


def alive_parameter_storages() -> dict[int, int]:
    """Bytes of every parameter storage alive in the process, by address."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter):
            try:
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
            except RuntimeError:  # a fake stand-in left by torch.compile in an earlier test: no memory
                continue
    return storages


def parameter_memory():
    """An evaluator that measures the bytes of the model parameters the training run holds.

    Parameters alive before the run (models an earlier test keeps, e.g. in a cache) are not counted,
    so the number does not depend on which tests ran first.
    """
    before = set(alive_parameter_storages())

    def evaluator(model, tokenizer, template, records) -> dict[str, float]:
        alive = alive_parameter_storages()
        return {"parameter_bytes": float(sum(n for address, n in alive.items() if address not in before))}

    return evaluator


def base_bytes(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        return sum(handle.get_tensor(name).nbytes for name in handle.keys())


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prefs")
    return (preference_set(root / "train.jsonl", ARITHMETIC_TRAIN, 240, seed=0),
            preference_set(root / "test.jsonl", ARITHMETIC_TEST, 40, seed=1))


def test_dpo_learns_held_out_preferences_with_lora_and_no_second_model(tmp_path, tiny_model, preference_files):
    train_file, test_file = preference_files
    config = TunelabConfig.model_validate(make_config(
        tmp_path, tiny_model, train_file, method={"type": "lora", "rank": 8},
        data={"eval": [str(test_file)], "max_length": 128},
        train={"objective": "dpo", "max_steps": 30, "lr": 5e-3, "batch_tokens": 2048, "eval_at_start": True,
               "log_every": 10},
    ))
    result = train(config, evaluators=[parameter_memory()])
    assert result.start_metrics["eval_rewards/accuracy"] < 0.6  # nothing learned yet
    assert result.final_metrics["eval_rewards/accuracy"] > 0.9
    assert result.final_metrics["eval_loss"] < result.start_metrics["eval_loss"] - 0.2
    # The reference is the base with adapters off: parameters are the base plus small adapters.
    assert result.final_metrics["parameter_bytes"] < 1.2 * base_bytes(tiny_model)


def test_full_dpo_keeps_a_frozen_reference_and_precompute_needs_none(tmp_path, tiny_model, preference_files):
    train_file, test_file = preference_files
    settings = dict(method={"type": "full"}, data={"eval": [str(test_file)], "max_length": 128},
                    train={"objective": "dpo", "max_steps": 3, "lr": 1e-4, "batch_tokens": 2048})
    copy = train(TunelabConfig.model_validate(make_config(tmp_path / "a", tiny_model, train_file, **settings)),
                 evaluators=[parameter_memory()])
    assert copy.final_metrics["parameter_bytes"] > 1.9 * base_bytes(tiny_model)  # policy + frozen copy
    del copy
    settings["dpo"] = {"precompute_reference": True}
    cached = train(TunelabConfig.model_validate(make_config(tmp_path / "b", tiny_model, train_file, **settings)),
                   evaluators=[parameter_memory()])
    assert cached.final_metrics["parameter_bytes"] < 1.1 * base_bytes(tiny_model)  # log-probs cached instead


@pytest.mark.parametrize("objective", ["simpo", "orpo", "kto"])
def test_reference_free_and_kto_objectives_train(tmp_path, tiny_model, preference_files, objective):
    train_file, test_file = preference_files
    if objective == "kto":  # chosen answers are desirable, refusals undesirable
        rows = []
        for line in train_file.read_text().splitlines():
            pair = json.loads(line)
            rows += [{"messages": pair["prompt"] + pair["chosen"], "label": True},
                     {"messages": pair["prompt"] + pair["rejected"], "label": False}]
        train_file = write_jsonl(tmp_path / "kto.jsonl", rows[:240])
        test_file = None
    config = TunelabConfig.model_validate(make_config(
        tmp_path, tiny_model, train_file, data={"eval": [str(test_file)] if test_file else None, "max_length": 128,
                                                "val_ratio": 0.1},
        train={"objective": objective, "max_steps": 12, "lr": 5e-3, "batch_tokens": 2048, "eval_at_start": True},
    ))
    result = train(config)
    assert result.final_metrics["eval_loss"] < result.start_metrics["eval_loss"]
    if objective == "kto":
        assert result.final_metrics["eval_rewards/chosen"] > result.final_metrics["eval_rewards/rejected"]
    else:
        assert result.final_metrics["eval_rewards/accuracy"] > 0.9


def test_reward_model_learns_and_loads_in_plain_transformers(tmp_path, tiny_model, preference_files):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.data.packing import collate_pairs
    from tunelab.models.reward_scoring import sequence_rewards

    train_file, test_file = preference_files
    config = TunelabConfig.model_validate(make_config(
        tmp_path, tiny_model, train_file, method={"type": "lora", "rank": 8},
        data={"eval": [str(test_file)], "max_length": 128},
        train={"objective": "reward", "max_steps": 30, "lr": 5e-3, "batch_tokens": 2048},
    ))
    result = train(config)
    assert result.final_metrics["eval_rewards/accuracy"] > 0.9

    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    loaded = PeftModel.from_pretrained(base, result.final_dir).eval()
    texts = [tokenizer.apply_chat_template(json.loads(line)["prompt"] + json.loads(line)[side], tokenize=False)
             for line in test_file.read_text().splitlines()[:4] for side in ("chosen", "rejected")]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hf_scores = loaded(**encoded).logits.squeeze(-1)
        rows = [{"input_ids": ids[mask.bool()].tolist(), "labels": ids[mask.bool()].tolist()}
                for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
        pairs = [{"input_ids": a["input_ids"], "labels": a["labels"], "pair_ids": b["input_ids"],
                  "pair_labels": b["labels"], "label": True} for a, b in zip(rows[0::2], rows[1::2])]
        ours = sequence_rewards(result.model.eval(), collate_pairs(pairs, packing=True, pad_id=0))
    assert torch.allclose(hf_scores, ours, atol=1e-4)
    assert (hf_scores[0::2] > hf_scores[1::2]).all()


def test_dpo_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model, preference_files):
    from training_runs import kill_after_step, losses

    train_file, test_file = preference_files
    settings = dict(data={"eval": [str(test_file)], "max_length": 128},
                    train={"objective": "dpo", "max_steps": 6, "save_every": 2, "lr": 5e-3, "batch_tokens": 2048})
    configs = {name: make_config(tmp_path / name, tiny_model, train_file, **settings) for name in ("a", "b")}
    train(TunelabConfig.model_validate(configs["a"]))  # uninterrupted, in this process
    (tmp_path / "b").mkdir()
    kill_after_step(write_config(tmp_path / "b", configs["b"]), 5)  # a real SIGKILL needs its own process
    resumed = train(TunelabConfig.model_validate(configs["b"]), resume=True)
    assert resumed.steps == 6
    expected = losses(tmp_path / "a" / "out")
    assert [step for step, _ in expected] == list(range(1, 7))
    assert losses(tmp_path / "b" / "out") == expected


def test_pissa_cannot_be_its_own_reference(tmp_path, tiny_model, preference_files):
    from pydantic import ValidationError

    config = make_config(tmp_path, tiny_model, preference_files[0], method={"type": "lora", "init": "pissa"},
                         train={"objective": "dpo", "batch_tokens": 2048}, data={"max_length": 128})
    with pytest.raises(ValidationError, match="precompute_reference"):
        TunelabConfig.model_validate(config)
    config["dpo"] = {"precompute_reference": True}  # reference log-probs come from the base before PiSSA
    TunelabConfig.model_validate(config)
