"""Rollouts on the tiny model: batched left-padded sampling, stop ids, seeds, PEFT, per-token log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from tunelab.data.templates import render_prompt, resolve_template
from tunelab.models.logprobs import forward_tokens, token_logprobs
from tunelab.train.rl.rollout import Rollouts, collate_rollouts, generate_rollouts

QUESTIONS = [
    "What is 2 + 3?",
    "Tell me a story about a cat and a dog.",
    "Hi",
    "There are 4 apples and 5 pears in a basket. How many fruits are in the basket?",
]
STOP = {1, 4}  # the tiny tokenizer's </s> and <|im_end|>


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Rendered, tokenized prompts of different lengths (so batches need padding)."""
    template = resolve_template(tokenizer, "auto")
    rendered = [render_prompt(tokenizer, template, [{"role": "user", "content": q}]) for q in QUESTIONS]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    assert len({len(p) for p in ids}) == len(ids)
    return ids


def _rollouts(model, tokenizer, prompts, **overrides) -> Rollouts:
    options = {"num_samples": 1, "max_new_tokens": 10, "temperature": 0.0, "top_p": 1.0, "stop_ids": STOP,
               "seed": 0, "batch_size": 4}
    options.update(overrides)
    return generate_rollouts(model, tokenizer, prompts, **options)


def test_left_padded_batches_give_the_unbatched_greedy_completions(model, tokenizer, prompts) -> None:
    batched = _rollouts(model, tokenizer, prompts, batch_size=4)
    one_by_one = _rollouts(model, tokenizer, prompts, batch_size=1)
    assert batched.completion_ids == one_by_one.completion_ids
    for prompt, completion in zip(prompts, batched.completion_ids):
        plain = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=sorted(STOP),
                               pad_token_id=tokenizer.pad_token_id)
        assert completion == plain[0, len(prompt):].tolist()[: len(completion)]
    assert batched.prompt_ids == prompts
    assert batched.completion_lengths() == [10, 10, 10, 10]
    assert batched.finished == [False] * 4


def test_stop_id_ends_a_completion_and_is_kept(model, tokenizer, prompts) -> None:
    free = _rollouts(model, tokenizer, prompts[:1], max_new_tokens=12).completion_ids[0]
    cut = next(k for k in range(2, 12) if free[k] not in free[:k])  # a token that first appears at position k
    stopped = _rollouts(model, tokenizer, prompts, max_new_tokens=12, stop_ids=STOP | {free[cut]})
    assert stopped.completion_ids[0] == free[: cut + 1]
    assert stopped.finished[0] is True
    for ids, finished in zip(stopped.completion_ids, stopped.finished):
        assert finished == (ids[-1] in STOP | {free[cut]})
        assert not any(token in STOP | {free[cut]} for token in ids[:-1])


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tokenizer, prompts) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = _rollouts(model, tokenizer, prompts, num_samples=3, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    again = _rollouts(model, tokenizer, prompts, num_samples=3, temperature=1.0, seed=5)
    other = _rollouts(model, tokenizer, prompts, num_samples=3, temperature=1.0, seed=6)
    assert first.completion_ids == again.completion_ids
    assert first.completion_ids != other.completion_ids
    assert first.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert first.num_samples == 3
    assert len({tuple(ids) for ids in first.completion_ids[:3]}) == 3  # a group holds different samples


def test_samples_come_from_the_policy_not_the_models_generation_defaults(tiny_model, tokenizer, prompts) -> None:
    """No hidden top-k (transformers defaults to 50) and no options from generation_config.json."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    many = _rollouts(model, tokenizer, prompts[:1], num_samples=400, max_new_tokens=1, temperature=1.0,
                     batch_size=400)
    assert len({ids[0] for ids in many.completion_ids}) > 100  # near-uniform tiny model: far more than 50 tokens
    reference = _rollouts(model, tokenizer, prompts, num_samples=2, temperature=0.9, top_p=0.95, seed=3)
    model.generation_config = GenerationConfig(top_k=1, repetition_penalty=3.0, no_repeat_ngram_size=1,
                                               eos_token_id=[1, 4], pad_token_id=2)
    meddled = _rollouts(model, tokenizer, prompts, num_samples=2, temperature=0.9, top_p=0.95, seed=3)
    assert meddled.completion_ids == reference.completion_ids
    assert model.generation_config.top_k == 1  # the model's own config is put back


def test_model_generates_in_eval_mode_and_is_restored(tiny_model, tokenizer, prompts) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.train()
    seen: list[bool] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    calls: list[int] = []
    try:
        rollouts = _rollouts(model, tokenizer, prompts, num_samples=3, batch_size=5, on_batch=calls.append)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert model.training
    assert calls == [5, 5, 2] and len(rollouts) == 12


def test_collate_marks_exactly_the_generated_tokens(model, tokenizer, prompts) -> None:
    rollouts = _rollouts(model, tokenizer, prompts, num_samples=2, temperature=1.0, max_new_tokens=8,
                         stop_ids=STOP | {prompts[0][-1]})
    batch = collate_rollouts(rollouts, tokenizer.pad_token_id)
    width = max(len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids))
    assert batch.input_ids.shape == (8, width)
    for row, (prompt, completion) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        mask = batch.completion_mask[row].bool()
        assert batch.input_ids[row][mask].tolist() == completion
        assert mask.nonzero()[:, 0].tolist() == list(range(len(prompt), len(prompt) + len(completion)))
        assert batch.input_ids[row, : len(prompt)].tolist() == prompt
        assert batch.attention_mask[row].sum().item() == len(prompt) + len(completion)
        assert batch.position_ids[row, : len(prompt) + len(completion)].tolist() == list(range(len(prompt) + len(completion)))
    subset = collate_rollouts(rollouts, tokenizer.pad_token_id, indices=[3, 1])
    assert subset.input_ids[0][subset.completion_mask[0].bool()].tolist() == rollouts.completion_ids[3]


def _direct(model, prompt: list[int], completion: list[int], temperature: float):
    """Full-logits log_softmax over the unpadded sequence, gathered at the completion tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float() / temperature
    logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    picked = logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_a_full_log_softmax(model, tokenizer, prompts, temperature: float) -> None:
    rollouts = _rollouts(model, tokenizer, prompts, num_samples=2, temperature=1.0, max_new_tokens=7, seed=1)
    batch = collate_rollouts(rollouts, tokenizer.pad_token_id)
    with torch.no_grad():
        stats = forward_tokens(model, batch, temperature=temperature, entropy=True, hidden=True)
        assert torch.equal(token_logprobs(model, batch, temperature), stats.logprobs)
    assert stats.logprobs.dtype == torch.float32
    for row, (prompt, completion) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        mask = batch.completion_mask[row].bool()
        picked, entropy = _direct(model, prompt, completion, temperature)
        torch.testing.assert_close(stats.logprobs[row][mask], picked, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.entropy[row][mask], entropy, atol=1e-5, rtol=0)
        assert stats.logprobs[row][~mask].abs().max().item() == 0.0
        assert stats.entropy[row][~mask].abs().max().item() == 0.0
    with torch.no_grad():
        last_hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    torch.testing.assert_close(stats.hidden[real], last_hidden[real], atol=1e-5, rtol=0)


def test_gradients_flow_through_token_logprobs(tiny_model, tokenizer, prompts) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rollouts = _rollouts(model, tokenizer, prompts, max_new_tokens=4)
    batch = collate_rollouts(rollouts, tokenizer.pad_token_id)
    token_logprobs(model, batch).sum().backward()
    assert model.lm_head.weight.grad.abs().sum().item() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum().item() > 0


def test_lora_policy_generates_and_scores_with_its_adapter(tiny_model, tokenizer, prompts) -> None:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    base_rollouts = _rollouts(base, tokenizer, prompts)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                            LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    policy.train()
    lora_rollouts = _rollouts(policy, tokenizer, prompts)
    assert policy.training
    assert lora_rollouts.completion_ids != base_rollouts.completion_ids
    with policy.disable_adapter():
        assert _rollouts(policy, tokenizer, prompts).completion_ids == base_rollouts.completion_ids
        batch = collate_rollouts(lora_rollouts, tokenizer.pad_token_id)
        with torch.no_grad():
            reference = token_logprobs(policy, batch)
    with torch.no_grad():
        torch.testing.assert_close(reference, token_logprobs(base, batch), atol=1e-5, rtol=0)
        assert not torch.allclose(token_logprobs(policy, batch), reference, atol=1e-3)


def test_bad_counts_are_refused(model, tokenizer, prompts) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        _rollouts(model, tokenizer, prompts, num_samples=0)
