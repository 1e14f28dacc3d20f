"""Generation with vLLM behind the same interface as the built-in engine (``tunelab serve --engine vllm``).

The HTTP API, auth, errors, streaming, request records and adapters are tunelab's (app.py); only
the decoding moves to vLLM. Prompts go in as token ids (tunelab renders the chat template, as in
training), generation stops only at the stop ids tunelab gives (the model's EOS ids; vLLM's own
EOS handling is off), and every token comes back with its log-probability for monitoring.

vLLM runs on an asyncio loop in a thread of its own: :meth:`VLLMEngine.submit` schedules one
task per request there; the task reads vLLM's cumulative outputs and hands the new tokens to the
request. A watcher task aborts (``AsyncLLMEngine.abort``) requests whose client went away or whose
time ran out. The queue bound counts requests accepted but without a first token yet, as in the
built-in engine; beyond it :class:`~tunelab.serve.engine.QueueFull` (429).

vLLM is imported only when this engine is built; without it, :func:`require_vllm` raises a
:class:`~tunelab.errors.TunelabError` that says how to install it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunelab.errors import TunelabError
from tunelab.serve.engine import EngineStats, GenerationRequest, QueueFull, model_context_length

# LoRAConfig.max_lora_rank accepts only these values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's CompletionOutput.finish_reason -> GenerationRequest.finish_reason ("abort" depends on why).
_FINISH_REASONS = {"stop": "stop", "length": "length"}


def require_vllm() -> tuple[ModuleType, type]:
    """The ``vllm`` module and its ``LoRARequest`` class.

    Raises:
        TunelabError: vLLM is not installed (it needs a CUDA GPU).
    """
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise TunelabError(
            f"--engine vllm needs vLLM, which is not installed here ({exc}). Install it on a machine with a "
            "CUDA GPU: pip install vllm (see docs/deploy.md, 'With vLLM'); or serve with the built-in engine "
            "(--engine builtin)"
        ) from None
    return vllm, LoRARequest


def lora_engine_args(adapters: dict[str, str]) -> dict[str, Any]:
    """vLLM engine arguments that let it serve ``adapters`` (name -> PEFT directory) side by side.

    ``max_loras`` is the number of adapters (all may share a batch); ``max_lora_rank`` is the
    largest rank among them, rounded up to a size vLLM accepts.

    Raises:
        TunelabError: a directory is not a LoRA adapter with safetensors weights, or uses what
            vLLM cannot serve (DoRA, modules_to_save, a rank above vLLM's largest).
    """
    if not adapters:
        return {"enable_lora": False}
    ranks = []
    for name, directory in adapters.items():
        where = f"--adapter {name}={directory}"
        config_file = Path(directory) / "adapter_config.json"
        if not config_file.is_file() or not (Path(directory) / "adapter_model.safetensors").is_file():
            raise TunelabError(f"{where}: not a PEFT adapter directory with safetensors weights")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        unsupported = [
            what for what, used in (
                (f"peft_type {config.get('peft_type')} (only LORA)", config.get("peft_type") != "LORA"),
                ("DoRA (use_dora)", config.get("use_dora")),
                (f"modules_to_save {config.get('modules_to_save')}", config.get("modules_to_save")),
            ) if used
        ]
        if unsupported:
            raise TunelabError(f"{where}: vLLM cannot serve this adapter ({', '.join(unsupported)}); serve it "
                               "with --engine builtin, or merge it (tunelab merge) and serve the merged model")
        ranks.append(max([int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]))
    rank = max(ranks)
    sized = next((size for size in VLLM_LORA_RANKS if size >= rank), None)
    if sized is None:
        raise TunelabError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}; "
                           "serve with --engine builtin")
    return {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": sized}


def load_serving_tokenizer(model_path: str, adapters: dict[str, str],
                           trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer the built-in server would use, without loading weights.

    The base model's, unless it has no chat template; then the first adapter directory's that
    holds a tokenizer with one (as :func:`tunelab.models.load.load_with_adapters` picks it).
    """
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code)
    for directory in adapters.values():
        if not tokenizer.chat_template and (Path(directory) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(directory, trust_remote_code)
    return tokenizer


def model_max_len(model_dir: str | Path, wanted: int) -> int:
    """``wanted`` tokens (prompt + answer), capped by the model's ``max_position_embeddings`` when it has one."""
    limit = model_context_length(model_dir)
    return wanted if limit is None else min(wanted, limit)


def structured_outputs(vllm: ModuleType, schema: dict | None) -> dict[str, Any] | None:
    """The ``SamplingParams`` argument that makes vLLM follow JSON ``schema`` (None: this vLLM cannot).

    vLLM >= 0.11 takes ``structured_outputs=StructuredOutputsParams(json=...)``; older releases
    ``guided_decoding=GuidedDecodingParams(json=...)``.
    """
    if schema is None:
        return {}
    module = vllm.sampling_params
    if hasattr(module, "StructuredOutputsParams"):
        return {"structured_outputs": module.StructuredOutputsParams(json=schema)}
    if hasattr(module, "GuidedDecodingParams"):
        return {"guided_decoding": module.GuidedDecodingParams(json=schema)}
    return None


def sampling_params(vllm: ModuleType, request: GenerationRequest) -> Any:
    """vLLM ``SamplingParams`` that decode ``request`` as the built-in engine does.

    Greedy at temperature 0, else temperature/top-p sampling seeded by ``request.seed``; OpenAI's
    presence/frequency penalties and logit bias (vLLM has the same semantics); stops at
    ``request.stop_ids`` only (``ignore_eos`` keeps vLLM from adding EOS ids of its own); the
    sampled token's log-probability with each token plus ``top_logprobs`` alternatives
    (``logprobs=k``), the prompt's with ``prompt_logprobs``; JSON schemas by vLLM's structured
    outputs; no detokenizing (tunelab decodes, with the same tokenizer and stop strings as the
    built-in engine). ``max_tokens`` 0 (score the prompt only) generates one token, which is dropped.
    """
    return vllm.SamplingParams(
        n=1, temperature=request.temperature, top_p=request.top_p, seed=request.seed,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        logit_bias=dict(request.logit_bias) or None, max_tokens=max(1, request.max_tokens),
        stop_token_ids=sorted(request.stop_ids), ignore_eos=True, logprobs=request.top_logprobs,
        prompt_logprobs=request.prompt_logprobs, detokenize=False,
        **(structured_outputs(vllm, request.json_schema) or {}),
    )


@dataclass
class _Live:
    """A request being generated: its task on the vLLM loop, and whether it is being stopped."""

    request: GenerationRequest
    task: asyncio.Task
    waiting: bool = True  # no token yet
    stopping: bool = False


class VLLMEngine:
    """vLLM's ``AsyncLLMEngine`` (optionally with LoRA adapters) behind the :class:`ServingEngine` interface.

    Args:
        model_path: HF model directory.
        tokenizer: the tokenizer the app renders and decodes with (the one training saved).
        adapters: adapter name -> PEFT LoRA directory; the API's ``model`` field picks one by name.
        max_queue: requests accepted but not generating yet, before :class:`QueueFull` (429).
        max_batch_size: vLLM's ``max_num_seqs`` (requests decoded together).
        max_model_len: longest prompt + answer in tokens (vLLM sizes its KV cache with it).
        dtype: weight dtype for vLLM ("bfloat16", "float16", "float32" or "auto").
        trust_remote_code: let vLLM run code shipped with the model.
        poll_s: how often cancelled and timed-out requests are looked for.

    Raises:
        TunelabError: vLLM is not installed, or an adapter cannot be served by it.
    """

    def __init__(self, model_path: str, tokenizer: PreTrainedTokenizerBase, adapters: dict[str, str] | None = None,
                 max_queue: int = 64, max_batch_size: int = 8, max_model_len: int | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False, poll_s: float = 0.02) -> None:
        self.vllm, lora_request = require_vllm()
        adapters = adapters or {}
        self.tokenizer = tokenizer
        config_file = Path(model_path) / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self.vocab_size = int(config.get("vocab_size") or len(tokenizer))
        self.max_queue, self.poll_s = max_queue, poll_s
        self.stats = EngineStats()
        self.loras = {name: lora_request(lora_name=name, lora_int_id=index, lora_path=str(Path(directory).resolve()))
                      for index, (name, directory) in enumerate(adapters.items(), start=1)}
        args = self.vllm.AsyncEngineArgs(
            model=str(model_path), dtype=dtype, trust_remote_code=trust_remote_code, max_model_len=max_model_len,
            max_num_seqs=max_batch_size, **lora_engine_args(adapters),
        )
        # Built outside any event loop: vLLM then starts its output handler on the loop of the first
        # generate() call, ours (vllm/v1/engine/async_llm.py).
        try:
            self.llm = self.vllm.AsyncLLMEngine.from_engine_args(args)
        except ValueError as exc:  # vLLM's word for a configuration it cannot run
            raise TunelabError(f"vLLM could not start on {model_path}: {exc}") from None
        self._lock = threading.Lock()
        self._waiting = 0
        self._live: dict[str, _Live] = {}  # touched only on the loop
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tunelab-vllm", daemon=True)
        self._thread.start()
        self._watcher: asyncio.Task | None = None
        self._loop.call_soon_threadsafe(self._start_watcher)
        self._closed = False

    @property
    def queued(self) -> int:
        """Requests accepted but without a first token yet."""
        return self._waiting

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Hand a request to vLLM (returns at once).

        Raises:
            QueueFull: ``max_queue`` requests are already waiting for their first token.
        """
        with self._lock:
            if self._closed or self._waiting >= self.max_queue:
                raise QueueFull
            self._waiting += 1
        asyncio.run_coroutine_threadsafe(self._start(request, uuid.uuid4().hex), self._loop)
        return request

    def unsupported(self, request: GenerationRequest) -> str | None:
        """``response_format`` (or ``tools``) when this vLLM has no structured outputs; else None."""
        if structured_outputs(self.vllm, request.json_schema) is None:
            return "response_format"
        return None

    def close(self) -> None:
        """Abort what is running, stop the loop thread and shut vLLM down."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.llm.shutdown()

    # -- on the vLLM loop -------------------------------------------------------------------------

    def _start_watcher(self) -> None:
        self._watcher = self._loop.create_task(self._watch())

    async def _start(self, request: GenerationRequest, request_id: str) -> None:
        self._live[request_id] = _Live(request, asyncio.create_task(self._generate(request, request_id)))

    async def _generate(self, request: GenerationRequest, request_id: str) -> None:
        """Run one request through vLLM, feeding its tokens into ``request``; always finishes it."""
        reason, error = "error", "vLLM ended the request without a final output"
        try:
            outputs = self.llm.generate({"prompt_token_ids": list(request.prompt_ids)},
                                        sampling_params(self.vllm, request), request_id,
                                        lora_request=self.loras[request.adapter] if request.adapter else None)
            async for output in outputs:
                completion = output.outputs[0]
                self._take_prompt(request, output)
                self._take(request_id, request, completion)
                if output.finished:
                    reason, error = _FINISH_REASONS.get(completion.finish_reason), None
                    if reason is None:  # "abort" (vLLM stopped it) or a reason tunelab does not know
                        reason, error = self._stopped(request, f"vLLM finished it with {completion.finish_reason!r}")
        except asyncio.CancelledError:  # from the watcher or close(): the client left, time ran out, shutdown
            reason, error = self._stopped(request, "the server is shutting down")
            await self.llm.abort(request_id)
        except Exception as exc:  # a failed request must not kill the server
            reason, error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            live = self._live.pop(request_id, None)
            if live is None or live.waiting:
                with self._lock:
                    self._waiting -= 1
            request.finish(reason, error if reason == "error" else None)

    @staticmethod
    def _stopped(request: GenerationRequest, otherwise: str) -> tuple[str, str | None]:
        """Why a request ended early: cancelled, timeout, else an error saying ``otherwise``."""
        if request.cancelled:
            return "cancelled", None
        if time.monotonic() - request.submitted > request.timeout:
            return "timeout", None
        return "error", otherwise

    @staticmethod
    def _ranked(entries: dict[int, Any], count: int) -> list[tuple[int, float]]:
        """The ``count`` most likely (token id, log-prob) pairs of a vLLM logprobs dict."""
        ordered = sorted(entries.items(), key=lambda item: -item[1].logprob)
        return [(token, entry.logprob) for token, entry in ordered[:count]]

    def _take_prompt(self, request: GenerationRequest, output: Any) -> None:
        """Prompt log-probs from the first ``RequestOutput`` (vLLM sends them once, the first entry None)."""
        if request.prompt_logprobs is None or request.prompt_token_logprobs or output.prompt_logprobs is None:
            return
        chosen: list[float | None] = [None]
        tops: list[list[tuple[int, float]] | None] = [None]
        for token, entries in zip(request.prompt_ids[1:], output.prompt_logprobs[1:]):
            chosen.append(entries[token].logprob if entries and token in entries else None)
            tops.append(self._ranked(entries or {}, request.prompt_logprobs))
        request.prompt_top, request.prompt_token_logprobs = tops, chosen

    def _take(self, request_id: str, request: GenerationRequest, completion: Any) -> None:
        """Hand the tokens of a cumulative ``CompletionOutput`` that ``request`` has not seen yet."""
        start = len(request.tokens)
        new = list(completion.token_ids[start:]) if request.max_tokens > 0 else []
        if not new:
            return
        live = self._live.get(request_id)
        if live is not None and live.waiting:
            live.waiting = False
            with self._lock:
                self._waiting -= 1
            running = sum(1 for other in self._live.values() if not other.waiting)
            request.batch_size = running
            self.stats.requests += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, running)
        logprobs = completion.logprobs
        for position, token in enumerate(new, start=start):
            entries = logprobs[position] if logprobs is not None and position < len(logprobs) else {}
            entry = entries.get(token)
            top = self._ranked(entries, request.top_logprobs) if request.top_logprobs else None
            request.add_token(token, entry.logprob if entry is not None else None, top)
            self.stats.generated_tokens += 1

    async def _watch(self) -> None:
        """Stop requests whose client is gone or whose time is up (their task aborts them in vLLM)."""
        while True:
            await asyncio.sleep(self.poll_s)
            now = time.monotonic()
            for live in list(self._live.values()):
                request = live.request
                if not live.stopping and (request.cancelled or now - request.submitted > request.timeout):
                    live.stopping = True
                    live.task.cancel()

    async def _stop_all(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        tasks = [live.task for live in self._live.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
