"""Rollout generators: the local one (batched or one by one) and the vLLM backend against a stand-in.

vLLM cannot run here (no GPU), so its backend is driven by an object with vLLM's API
(``LLM(...)``, ``LLM.generate(prompts, sampling_params=[SamplingParams(...)])`` returning
``RequestOutput``s whose ``outputs`` carry ``token_ids``, ``finish_reason`` and ``stop_reason``,
the in-process model's ``load_weights``, ``reset_prefix_cache``), as tests do for llama.cpp.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunelab.config import config_from_dict
from tunelab.errors import ConfigError
from tunelab.train.rl.generators import LocalGenerator, VLLMGenerator, build_generator, merged_weights

END_OF_TURN = 7  # a second stop id besides the tokenizer's EOS


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    detokenize: bool = True


class FakeLLM:
    """Answers each request with scripted completions; records what it was asked and the weights it got."""

    script: list[list[tuple[list[int], str, object]]] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.requests, self.loaded, self.cache_resets = kwargs, [], [], 0
        model = SimpleNamespace(load_weights=lambda weights: self.loaded.append(dict(weights)))
        worker = SimpleNamespace(worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))

    def reset_prefix_cache(self) -> None:
        self.cache_resets += 1

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.requests.append((prompts, sampling_params))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop)
                                         for ids, reason, stop in answers][: params.n])
                for answers, params in zip(self.script, sampling_params, strict=True)]


FAKE_VLLM = SimpleNamespace(LLM=FakeLLM, SamplingParams=SamplingParams)


def vllm_generator(tokenizer) -> VLLMGenerator:
    assert tokenizer.eos_token_id != END_OF_TURN
    return VLLMGenerator("base-dir", tokenizer, max_new_tokens=5, top_p=0.9,
                         stop_ids={tokenizer.eos_token_id, END_OF_TURN},
                         gpu_memory_utilization=0.25, max_model_len=128, dtype="bfloat16", seed=3,
                         vllm_module=FAKE_VLLM)


def test_vllm_backend_asks_vllm_for_what_the_config_says_and_returns_rollouts(tokenizer, tiny_model):
    generator = vllm_generator(tokenizer)
    assert generator.llm.kwargs == {"model": "base-dir", "tokenizer": "base-dir", "gpu_memory_utilization": 0.25,
                                    "max_model_len": 128, "dtype": "bfloat16", "seed": 3,
                                    "enable_prefix_caching": True}
    FakeLLM.script = [
        [([10, 11, END_OF_TURN], "stop", END_OF_TURN), ([12, 13], "stop", None)],  # kept; EOS left out by vLLM
        [([14, 15, 16, 17, 18], "length", None), ([19, END_OF_TURN, 20], "stop", END_OF_TURN)],
    ]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rollouts = generator.generate(model, [[1, 2, 3], [4, 5]], num_samples=2, temperature=0.7, seed=100)
    prompts, params = generator.llm.requests[0]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    assert [(p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed, p.detokenize) for p in params] == [
        (2, 0.7, 0.9, -1, 5, 100, False), (2, 0.7, 0.9, -1, 5, 101, False)]
    eos = tokenizer.eos_token_id
    assert params[0].stop_token_ids == sorted({eos, END_OF_TURN})
    assert rollouts.prompt_index == [0, 0, 1, 1] and rollouts.num_samples == 2
    assert rollouts.prompt_ids == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    # a kept stop id stays; an EOS vLLM left out is put back (the policy must learn to stop); a length cut
    # is not finished; text after a stop id is cut
    assert rollouts.completion_ids == [[10, 11, END_OF_TURN], [12, 13, eos], [14, 15, 16, 17, 18],
                                       [19, END_OF_TURN]]
    assert rollouts.finished == [True, True, False, True]

    FakeLLM.script = [[([21], "length", None)]]
    greedy = generator.generate(model, [[1]], num_samples=1, temperature=0.0, seed=5)
    params = generator.llm.requests[1][1][0]
    assert (params.temperature, params.top_k, params.top_p) == (0.0, 1, 1.0) and greedy.completion_ids == [[21]]


def test_vllm_backend_loads_the_policy_first_and_after_every_update_with_lora_merged(tokenizer, tiny_model):
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    generator = vllm_generator(tokenizer)
    FakeLLM.script = [[([tokenizer.eos_token_id], "stop", None)]]
    generator.generate(policy, [[1]], 1, 1.0, 0)
    generator.generate(policy, [[1]], 1, 1.0, 0)
    assert len(generator.llm.loaded) == 1 and generator.llm.cache_resets == 1  # no update in between: no reload
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5)
    generator.weights_changed()
    generator.generate(policy, [[1]], 1, 1.0, 0)
    assert len(generator.llm.loaded) == 2
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    loaded = generator.llm.loaded[-1]
    assert loaded.keys() == expected.keys()  # the base model's names: what vLLM's load_weights expects
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)
    assert not any(module.merged for module in policy.modules() if hasattr(module, "merged"))  # unmerged again


def test_merged_weights_of_a_full_model_are_its_state_dict(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    weights = merged_weights(model)
    assert weights.keys() == model.state_dict().keys()


def test_one_by_one_generation_gives_the_batched_greedy_rollouts(tiny_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("a b c", "hello there", "1 + 2")]
    stops = {tokenizer.eos_token_id}
    batched = LocalGenerator(tokenizer, 6, 1.0, stops, 8).generate(model, prompts, 2, 0.0, 0)
    one = LocalGenerator(tokenizer, 6, 1.0, stops, 1).generate(model, prompts, 2, 0.0, 0)
    assert one.completion_ids == batched.completion_ids and one.prompt_index == batched.prompt_index


def test_vllm_is_refused_clearly_where_it_cannot_run(tokenizer):
    config = config_from_dict({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o",
                               "train": {"objective": "grpo"},
                               "grpo": {"reward_fn": ["format"], "rollout_generator": "vllm"}})
    with pytest.raises(ConfigError, match="rollout_generator vllm: vLLM (is not installed|generates on CUDA)"):
        build_generator(config, tokenizer, {tokenizer.eos_token_id}, "m", torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="use distributed.strategy ddp or none"):
        config_from_dict({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o",
                          "train": {"objective": "grpo"},
                          "grpo": {"reward_fn": ["format"], "rollout_generator": "vllm"},
                          "distributed": {"strategy": "fsdp"}})
