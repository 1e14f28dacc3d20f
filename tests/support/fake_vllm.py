"""A small stand-in for vLLM's async engine API, to test tunelab's vLLM engine on a CPU.

The shapes follow vLLM's source (V1 engine): ``AsyncEngineArgs`` (vllm/engine/arg_utils.py; only
the fields tunelab passes, so a misspelt one is a TypeError), ``AsyncLLMEngine.from_engine_args``
and ``async generate(prompt, sampling_params, request_id, *, lora_request=...)`` yielding
*cumulative* ``RequestOutput`` objects — the same growing token and logprob lists each time —
until one is ``finished``, ``abort`` and ``shutdown`` (vllm/v1/engine/async_llm.py),
``SamplingParams`` (vllm/sampling_params.py), ``CompletionOutput``/``RequestOutput``
(vllm/outputs.py), ``Logprob`` (vllm/logprobs.py) and ``LoRARequest`` (vllm/lora/request.py).
Decoding runs the real tiny HF model (with the PEFT adapter a LoRARequest names), one token per
step without a KV cache: greedy at temperature 0, else seeded temperature/top-p sampling.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


@dataclass
class AsyncEngineArgs:
    model: str
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0 or not 0.0 <= self.temperature <= 2.0:
            raise ValueError("top_p must be in (0, 1] and temperature in [0, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        assert self.lora_path, "lora_path cannot be empty"


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class Call:
    """One generate() call as the engine received it."""

    request_id: str
    prompt: dict
    params: SamplingParams
    lora_request: LoRARequest | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class AsyncLLMEngine:
    """Generates with a tiny HF model; records what tunelab asked of it."""

    built: ClassVar[list[AsyncLLMEngine]] = []  # every engine from_engine_args made, newest last

    def __init__(self, args: AsyncEngineArgs) -> None:
        self.args = args
        self.base = AutoModelForCausalLM.from_pretrained(args.model).eval()
        self.with_lora: dict[int, PeftModel] = {}
        self.calls: list[Call] = []
        self.aborted: list[str] = []
        self.open = threading.Event()  # cleared: requests wait as if vLLM's scheduler had no room
        self.open.set()
        self.step_delay = 0.0
        self.shut_down = False

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True,
                         usage_context: Any = None, stat_loggers: Any = None) -> AsyncLLMEngine:
        engine = cls(engine_args)
        cls.built.append(engine)
        return engine

    def _model(self, lora: LoRARequest | None) -> torch.nn.Module:
        if lora is None:
            return self.base
        assert self.args.enable_lora, "a LoRARequest needs enable_lora=True"
        if lora.lora_int_id not in self.with_lora:
            fresh = AutoModelForCausalLM.from_pretrained(self.args.model)
            self.with_lora[lora.lora_int_id] = PeftModel.from_pretrained(fresh, lora.lora_path).eval()
        return self.with_lora[lora.lora_int_id]

    @torch.no_grad()
    def _next(self, model: torch.nn.Module, ids: list[int], params: SamplingParams,
              generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)  # vLLM's default logprobs_mode: raw logprobs
        for token, bias in (params.logit_bias or {}).items():
            logits[token] += bias
        if params.temperature < 1e-5:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / params.temperature, dim=-1)
            ordered, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(ordered, dim=-1) - ordered < params.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
            token = int(torch.multinomial(probs, 1, generator=generator))
        return token, log_probs

    async def generate(self, prompt: dict, sampling_params: SamplingParams, request_id: str, *,
                       prompt_text: str | None = None, lora_request: LoRARequest | None = None,
                       tokenization_kwargs: dict | None = None, trace_headers: Any = None, priority: int = 0,
                       data_parallel_rank: int | None = None):
        call = Call(request_id, prompt, sampling_params, lora_request)
        self.calls.append(call)
        params, prompt_ids = sampling_params, list(prompt["prompt_token_ids"])
        eos = None if params.ignore_eos else self.base.generation_config.eos_token_id
        tokens: list[int] = []  # one list, grown in place: vLLM hands out its detokenizer's list
        logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        try:
            while not self.open.is_set() and request_id not in self.aborted:
                await asyncio.sleep(0.005)
            model = self._model(lora_request)
            while True:
                if request_id in self.aborted:
                    reason = "abort"
                else:
                    token, log_probs = self._next(model, prompt_ids + tokens, params, generator)
                    logprob = float(log_probs[token])
                    tokens.append(token)
                    call.tokens.append(token)
                    call.logprobs.append(logprob)
                    if logprobs is not None:  # the sampled token and the `logprobs` most likely ones
                        values, ids = torch.topk(log_probs, params.logprobs) if params.logprobs else ([], [])
                        entry = {int(i): Logprob(float(v), rank=r) for r, (i, v) in enumerate(zip(ids, values), 1)}
                        entry.setdefault(token, Logprob(logprob))
                        logprobs.append(entry)
                    reason = ("stop" if token in params.stop_token_ids or token == eos
                              else "length" if len(tokens) >= params.max_tokens else None)
                completion = CompletionOutput(0, "", tokens, None, logprobs, reason)
                yield RequestOutput(request_id, None, prompt_ids, self._prompt_logprobs(model, prompt_ids, params),
                                    [completion], reason is not None)
                if reason is not None:
                    return
                await asyncio.sleep(self.step_delay)
        except (asyncio.CancelledError, GeneratorExit):  # as vLLM does: a cancelled generate() aborts
            await self.abort(request_id)
            raise

    @torch.no_grad()
    def _prompt_logprobs(self, model: torch.nn.Module, ids: list[int],
                         params: SamplingParams) -> list[dict[int, Logprob] | None] | None:
        """vLLM's prompt_logprobs: None first, then each prompt token and the k most likely."""
        if params.prompt_logprobs is None:
            return None
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        result: list[dict[int, Logprob] | None] = [None]
        for position, token in enumerate(ids[1:]):
            values, top = torch.topk(log_probs[position], params.prompt_logprobs) if params.prompt_logprobs else ([], [])
            entry = {int(i): Logprob(float(v), rank=r) for r, (i, v) in enumerate(zip(top, values), 1)}
            entry.setdefault(token, Logprob(float(log_probs[position, token])))
            result.append(entry)
        return result

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


def install(monkeypatch: pytest.MonkeyPatch) -> type[AsyncLLMEngine]:
    """Put this fake in ``sys.modules`` as ``vllm`` and ``vllm.lora.request``; returns its engine class."""
    vllm, lora, request = ModuleType("vllm"), ModuleType("vllm.lora"), ModuleType("vllm.lora.request")
    sampling = ModuleType("vllm.sampling_params")
    vllm.AsyncEngineArgs, vllm.AsyncLLMEngine, vllm.SamplingParams = AsyncEngineArgs, AsyncLLMEngine, SamplingParams
    sampling.SamplingParams, sampling.StructuredOutputsParams = SamplingParams, StructuredOutputsParams
    request.LoRARequest = LoRARequest
    vllm.lora, lora.request, vllm.sampling_params = lora, request, sampling
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request),
                         ("vllm.sampling_params", sampling)):
        monkeypatch.setitem(sys.modules, name, module)
    return AsyncLLMEngine
