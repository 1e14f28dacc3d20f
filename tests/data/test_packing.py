"""Padding-free packing: packed rows give the same logits and loss as separate sequences."""

from __future__ import annotations

import math

import pytest
import torch
from token_examples import random_examples
from transformers import AutoModelForCausalLM

from tunelab.data.packing import collate_packed, collate_padded, plan_packed, plan_padded, shifted_targets
from tunelab.data.templates import IGNORE_INDEX
from tunelab.models.attention import register_packed_sdpa, segment_lengths
from tunelab.train.objectives.sft import causal_lm_loss


@pytest.mark.parametrize("attention", ["sdpa", "packed_sdpa", "eager"])
def test_packed_logits_equal_per_sequence_logits(tiny_model, attention):
    name = register_packed_sdpa() if attention == "packed_sdpa" else attention
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=name, dtype=torch.float32).eval()
    examples = random_examples(5, model.config.vocab_size)
    batch = collate_packed(examples)
    with torch.no_grad():
        packed = model(**batch.model_inputs()).logits[0]
        separate = torch.cat([model(torch.tensor([e["input_ids"]])).logits[0] for e in examples])
    relative = (packed - separate).abs().max() / separate.abs().max()
    assert relative < 1e-5


def test_packed_rows_keep_a_sliding_window(tiny_mistral):
    """A sliding-window model (Mistral) attends to the same keys packed as alone, also past its window."""
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (12, 3, 9)]
    batch = collate_packed([{"input_ids": ids, "labels": ids} for ids in sequences])
    logits = {}
    for name in ("sdpa", register_packed_sdpa()):
        model = AutoModelForCausalLM.from_pretrained(tiny_mistral, attn_implementation=name).eval()
        with torch.no_grad():
            logits[name] = (torch.cat([model(torch.tensor([ids])).logits[0] for ids in sequences]) if name == "sdpa"
                            else model(**batch.model_inputs()).logits[0])
    assert torch.allclose(logits["packed_sdpa"], logits["sdpa"], atol=1e-5)
    model.config.sliding_window = None  # the window matters here: without it the answers differ
    with torch.no_grad():
        unwindowed = model(**batch.model_inputs()).logits[0]
    assert not torch.allclose(unwindowed, logits["sdpa"], atol=1e-3)


def test_packed_loss_equals_sum_of_per_sequence_losses(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=register_packed_sdpa()).eval()
    examples = random_examples(6, model.config.vocab_size, seed=1)
    with torch.no_grad():
        packed = causal_lm_loss(model, collate_packed(examples))
        separate = sum(causal_lm_loss(model, collate_packed([e])) for e in examples)
        padded = causal_lm_loss(model, collate_padded(examples, pad_id=0))
    assert torch.allclose(packed, separate, rtol=1e-5)
    assert torch.allclose(padded, separate, rtol=1e-5)


def test_targets_never_cross_sequence_boundaries():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}]
    batch = collate_packed(examples)
    # position 2 (last of the first sequence) must not predict 8, the first token of the next one.
    assert batch.targets.tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.attention_mask is None and batch.seq_lens == [[3, 2]]
    assert batch.num_trained == 3 and batch.num_tokens == 5
    assert shifted_targets([1, 2, 3]) == [2, 3, IGNORE_INDEX]
    assert segment_lengths(batch.position_ids) == [[3, 2]]


def test_packed_plan_covers_every_sequence_once_within_budget():
    lengths = [int(x) for x in torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(0))]
    rows = plan_packed(lengths, batch_tokens=1024, seed=3, epoch=0)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    fill = sum(lengths) / (len(rows) * 1024)
    assert fill > 0.9  # first-fit over open rows leaves little room unused
    assert rows == plan_packed(lengths, 1024, seed=3, epoch=0)
    assert rows != plan_packed(lengths, 1024, seed=3, epoch=1)


def test_padded_plan_groups_similar_lengths():
    lengths = [int(x) for x in torch.randint(1, 300, (512,), generator=torch.Generator().manual_seed(0))]
    batches = plan_padded(lengths, batch_size=8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(512))
    assert all(len(b) <= 8 for b in batches)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    random_padded = sum(max(lengths[i] for i in range(k, k + 8)) * 8 for k in range(0, 512, 8))
    assert padded < 0.75 * random_padded


def test_a_model_that_cannot_pack_is_detected(tiny_model):
    """An attention that ignores restarting positions (plain causal over the row) fails the start-up probe."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    from tunelab.train.engine import packing_supported

    def causal_over_row(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=kwargs.get("scaling"))

    AttentionInterface.register("causal_over_row", causal_over_row)
    AttentionMaskInterface.register("causal_over_row", lambda *args, **kwargs: None)
    cannot = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="causal_over_row")
    can = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=register_packed_sdpa())
    assert not packing_supported(cannot, torch.device("cpu"))
    assert packing_supported(can, torch.device("cpu"))


def test_engine_falls_back_to_padded_batches(tmp_path, tiny_model, monkeypatch, capsys):
    from conftest import ALPACA_DEMO, make_config
    from tunelab.config import config_from_dict
    from tunelab.train import batches, engine

    monkeypatch.setattr(engine, "packing_supported", lambda model, device: False)
    seen = []
    real = batches.collate_padded
    monkeypatch.setattr(batches, "collate_padded", lambda *a, **k: seen.append(1) or real(*a, **k))
    engine.train(config_from_dict(make_config(tmp_path, tiny_model, ALPACA_DEMO, train={"max_steps": 2})))
    assert seen and "does not support padding-free packing; using padded batches" in capsys.readouterr().err


def test_every_epoch_visits_every_sequence_once_even_when_packing_changes_the_row_count():
    import datasets

    from tunelab.train.batches import MicroBatches

    lengths = [int(x) for x in torch.randint(100, 500, (60,), generator=torch.Generator().manual_seed(1))]
    dataset = datasets.Dataset.from_dict({"input_ids": [[7] * n for n in lengths],
                                          "labels": [[-100] + [7] * (n - 1) for n in lengths]})
    stream = MicroBatches(dataset, packing=True, batch_tokens=512, batch_size=8, pad_id=0, seed=0)
    sizes = [len(plan_packed(lengths, 512, 0, epoch)) for epoch in range(6)]
    assert len(set(sizes)) > 1  # the shuffle changes how many rows an epoch needs
    assert stream.count(3) == sum(sizes[:3]) and stream.count(2.5) == sum(sizes[:2]) + math.ceil(sizes[2] / 2)
    m = 0
    for epoch in range(3):
        tokens = 0
        for _ in range(sizes[epoch]):
            assert stream.locate(m)[0] == epoch
            tokens += stream.get(m).num_tokens
            m += 1
        assert tokens == sum(lengths)
    assert stream.progress(sizes[0] + sizes[1] // 2) == pytest.approx(1 + (sizes[1] // 2) / sizes[1])
