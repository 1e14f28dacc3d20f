"""DPO with an NLL term on the chosen answer (dpo.rpo_alpha, RPO): the loss adds alpha x the chosen tokens' mean NLL."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.config import TunelabConfig
from tunelab.data.packing import collate_pairs
from tunelab.train.objectives.preference import PreferenceObjective


def test_rpo_adds_the_mean_nll_of_the_chosen_tokens(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    reference = copy.deepcopy(model)  # equal policy and reference: the DPO term is log 2 per pair
    generator = torch.Generator().manual_seed(1)
    pairs, chosen_ids = [], []
    for length, prompt in ((9, 4), (12, 5), (7, 3)):
        chosen = torch.randint(3, 200, (length,), generator=generator).tolist()
        rejected = chosen[:prompt] + torch.randint(3, 200, (length - prompt + 2,), generator=generator).tolist()
        mask = lambda ids: [-100] * prompt + ids[prompt:]  # noqa: E731
        pairs.append({"input_ids": chosen, "labels": mask(chosen), "pair_ids": rejected, "pair_labels": mask(rejected),
                      "label": True})
        chosen_ids.append((chosen, prompt))
    batch = collate_pairs(pairs, packing=True, pad_id=0)
    plain, rpo = PreferenceObjective("dpo", 0.1, reference=reference), PreferenceObjective(
        "dpo", 0.1, reference=reference, rpo_alpha=0.7)
    with torch.no_grad():
        base_loss, _ = plain.loss(model, batch, plain.window_totals([batch]))
        rpo_loss, metrics = rpo.loss(model, batch, rpo.window_totals([batch]))
        nll_sum, tokens = 0.0, 0
        for ids, prompt in chosen_ids:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(ids[1:])
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[prompt - 1:]
            nll_sum, tokens = nll_sum + float(losses.sum()), tokens + len(losses)
    assert abs(float(base_loss) - torch.log(torch.tensor(2.0)).item()) < 1e-5
    assert abs(float(rpo_loss - base_loss) - 0.7 * nll_sum / tokens) < 1e-4
    total, count = metrics["nll"]
    assert count == tokens and abs(total / count - nll_sum / tokens) < 1e-4


def test_rpo_alpha_is_refused_for_other_objectives(tiny_model, tmp_path):
    from conftest import make_config

    from tunelab.config import config_from_dict
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="rpo_alpha .* applies to train.objective dpo only"):
        config_from_dict(make_config(tmp_path, tiny_model, "x.jsonl", train={"objective": "simpo"},
                                     simpo={"rpo_alpha": 1.0}))
    with pytest.raises(ValueError, match="simpo.rpo_alpha"):  # the schema itself refuses it, without the loader
        TunelabConfig.model_validate(make_config(tmp_path, tiny_model, "x.jsonl", train={"objective": "simpo"},
                                                 simpo={"rpo_alpha": 1.0}))
