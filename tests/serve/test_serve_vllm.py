"""``tunelab serve --engine vllm``: the same API on vLLM's engine, tested against a fake of its API (fake_vllm.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fake_vllm
import httpx
import openai
import pytest
from live_server import KEY, QUESTION, LiveServer, error_of, stream_and_hang_up
from peft import PeftModel
from served_models import greedy, make_adapter
from transformers import AutoModelForCausalLM

from tunelab.cli import main
from tunelab.data.templates import render_prompt, resolve_template
from tunelab.errors import TunelabError
from tunelab.models.load import stop_token_ids
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import GenerationRequest
from tunelab.serve.vllm_engine import VLLMEngine, load_serving_tokenizer, lora_engine_args, require_vllm


class Records:
    """A record sink that keeps what it is given."""

    def __init__(self) -> None:
        self.rows = []

    def record(self, row) -> None:
        self.rows.append(row)


def build_engine(model_dir, adapters, **kwargs):
    """A VLLMEngine on the fake vLLM, its fake engine and tokenizer."""
    with pytest.MonkeyPatch.context() as patch:
        fake_vllm.install(patch)
        tokenizer = load_serving_tokenizer(str(model_dir), adapters)
        engine = VLLMEngine(str(model_dir), tokenizer, adapters, dtype="float32", **kwargs)
    return engine, fake_vllm.AsyncLLMEngine.built[-1], tokenizer


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve-vllm")
    adapters = {name: str(make_adapter(tiny_model, directory / name, seed))
                for name, seed in (("alpha", 1), ("beta", 2))}
    engine, fake, tokenizer = build_engine(tiny_model, adapters, max_queue=64, max_batch_size=8, max_model_len=264)
    settings = ServeSettings(model_name="tiny", adapters=tuple(adapters), api_key=KEY, max_prompt_tokens=200,
                             max_tokens_limit=64, default_max_tokens=16, timeout=30)
    records = Records()
    template = resolve_template(tokenizer, "auto")
    app = create_app(engine, template, stop_token_ids(str(tiny_model), tokenizer), settings,
                     record_sinks=[records])
    live = LiveServer(app)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
    yield {"live": live, "client": client, "engine": engine, "fake": fake, "adapters": adapters, "tiny": tiny_model,
           "tokenizer": tokenizer, "template": template, "records": records}
    live.close()
    engine.close()
    assert fake.shut_down


def test_chat_streaming_and_completions_answer_as_the_builtin_engine(served):
    client, tokenizer = served["client"], served["tokenizer"]
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=16)
    base = AutoModelForCausalLM.from_pretrained(served["tiny"]).eval()
    assert reply.choices[0].message.content == greedy(base, tokenizer, QUESTION)  # train/serve parity
    assert reply.usage.completion_tokens == len(served["fake"].calls[-1].tokens) <= 16
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=16,
                                                stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == reply.choices[0].message.content and finish == reply.choices[0].finish_reason
    plain = client.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The cat", max_tokens=8, temperature=0, stream=True))
    assert plain.object == "text_completion" and plain.choices[0].text == streamed
    assert served["fake"].calls[-1].prompt == {"prompt_token_ids": tokenizer("The cat")["input_ids"]}


def test_sampling_params_follow_the_request(served):
    client, fake, tokenizer = served["client"], served["fake"], served["tokenizer"]
    client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0.7, top_p=0.9, max_tokens=12, seed=5)
    call = fake.calls[-1]
    stop_ids = stop_token_ids(str(served["tiny"]), tokenizer)
    params = call.params
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (1, 0.7, 0.9, 12, 5)
    assert params.stop_token_ids == sorted(stop_ids) and params.ignore_eos  # only tunelab's stop ids
    assert params.logprobs == 0 and params.prompt_logprobs is None and not params.detokenize
    rendered = render_prompt(tokenizer, served["template"], QUESTION)
    assert call.prompt == {"prompt_token_ids": tokenizer(rendered, add_special_tokens=False)["input_ids"]}
    assert call.lora_request is None
    sampled = [client.chat.completions.create(model="tiny", messages=QUESTION, temperature=1.0, seed=s,
                                              max_tokens=12).choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_new_fields_map_onto_sampling_params(served):
    client, fake, tokenizer = served["client"], served["fake"], served["tokenizer"]
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=2, presence_penalty=0.5,
                                           frequency_penalty=0.25, logit_bias={"7": 3.0})
    params = fake.calls[-1].params
    assert (params.logprobs, params.presence_penalty, params.frequency_penalty) == (2, 0.5, 0.25)
    assert params.logit_bias == {7: 3.0} and params.structured_outputs is None
    content = reply.choices[0].logprobs.content
    assert len(content) == len(fake.calls[-1].tokens) and all(len(e.top_logprobs) == 2 for e in content)
    assert [e.logprob for e in content] == pytest.approx(fake.calls[-1].logprobs)
    ids = tokenizer("The cat sat")["input_ids"]
    echoed = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert fake.calls[-1].params.prompt_logprobs == 1 and fake.calls[-1].params.max_tokens == 1  # one token, dropped
    logprobs = echoed.choices[0].logprobs
    assert echoed.usage.completion_tokens == 0 and len(logprobs.tokens) == len(ids)
    assert logprobs.token_logprobs[0] is None and all(lp < 0 for lp in logprobs.token_logprobs[1:])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert fake.calls[-1].params.structured_outputs.json == schema  # vLLM enforces the schema itself
    without = served["engine"].vllm.sampling_params
    try:
        del without.StructuredOutputsParams  # a vLLM with neither structured outputs nor guided decoding
        refused = httpx.post(f"{served['live'].url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             timeout=30, json={"model": "tiny", "messages": QUESTION, "response_format": {
                                 "type": "json_object"}})
    finally:
        without.StructuredOutputsParams = fake_vllm.StructuredOutputsParams
    assert refused.status_code == 400 and error_of(refused)["param"] == "response_format"


def test_adapters_are_lora_requests_chosen_by_model_name(served):
    client, fake, tokenizer = served["client"], served["fake"], served["tokenizer"]
    assert (fake.args.enable_lora, fake.args.max_loras, fake.args.max_lora_rank) == (True, 2, 8)  # r=4 -> 8
    for index, name in enumerate(("alpha", "beta"), start=1):
        base = AutoModelForCausalLM.from_pretrained(served["tiny"])
        expected = greedy(PeftModel.from_pretrained(base, served["adapters"][name]).eval(), tokenizer, QUESTION)
        reply = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected, name
        lora = fake.calls[-1].lora_request
        assert (lora.lora_name, lora.lora_int_id) == (name, index)
        assert lora.lora_path == str(Path(served["adapters"][name]).resolve())


def test_records_get_vllm_logprobs_and_metrics_count(served):
    client, fake, records = served["client"], served["fake"], served["records"]
    client.chat.completions.create(model="beta", messages=QUESTION, temperature=0, max_tokens=6)
    call = fake.calls[-1]
    assert wait_for(lambda: any(r.model == "beta" and r.completion_tokens == len(call.tokens) for r in records.rows))
    row = next(r for r in reversed(records.rows) if r.model == "beta")
    assert row.status == 200 and row.mean_logprob == pytest.approx(sum(call.logprobs) / len(call.logprobs))
    assert row.mean_logprob < 0 and row.batch_size >= 1 and row.time_to_first_token_s is not None
    text = httpx.get(f"{served['live'].url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'tunelab_requests_total{endpoint="chat",status="200"}' in text and "tunelab_queue_depth 0" in text
    assert served["engine"].stats.generated_tokens >= len(call.tokens) and served["engine"].stats.max_batch_seen >= 1


def test_disconnect_aborts_the_vllm_request(served):
    url, fake = served["live"].url, served["fake"]
    fake.step_delay = 0.05
    try:
        stream_and_hang_up(url)
        call = fake.calls[-1]
        assert wait_for(lambda: call.request_id in fake.aborted)
        assert len(call.tokens) < 64
        assert wait_for(lambda: any(r.status == 499 for r in served["records"].rows))
    finally:
        fake.step_delay = 0.0


def test_full_queue_answers_429_and_cancel_and_timeout_abort(tiny_model):
    engine, fake, tokenizer = build_engine(tiny_model, {}, max_queue=1, max_batch_size=1)
    settings = ServeSettings(model_name="tiny", max_tokens_limit=32, timeout=30)
    live = LiveServer(create_app(engine, resolve_template(tokenizer, "auto"), set(), settings))
    ask = lambda: httpx.post(f"{live.url}/v1/chat/completions", timeout=30,  # noqa: E731
                             json={"model": "tiny", "messages": QUESTION, "max_tokens": 4})
    try:
        fake.open.clear()  # vLLM holds every request back: none gets a first token
        waiting = engine.submit(GenerationRequest([1, 2, 3], 4, set()))
        assert wait_for(lambda: len(fake.calls) == 1) and engine.queued == 1
        full = ask()
        assert full.status_code == 429
        assert error_of(full)["type"] == "rate_limit_error" and error_of(full)["code"] == "queue_full"
        waiting.cancel()
        assert waiting.done.wait(10) and waiting.finish_reason == "cancelled"
        assert fake.calls[0].request_id in fake.aborted and engine.queued == 0
        settings.timeout = 0.3
        slow = ask()
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"
        assert fake.calls[-1].request_id in fake.aborted
        fake.open.set()
        settings.timeout = 30
        assert ask().status_code == 200
    finally:
        live.close()
        engine.close()


def test_missing_vllm_is_a_clear_error(monkeypatch, capsys, tiny_model):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(TunelabError, match="pip install vllm"):
        require_vllm()
    assert main(["serve", "--engine", "vllm", "--model", str(tiny_model), "--no-monitor"]) == 2
    err = capsys.readouterr().err
    assert "pip install vllm" in err and "CUDA" in err and "Traceback" not in err


def test_the_cli_serves_with_the_vllm_engine(tiny_model, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from tunelab.serve.server import GracefulServer

    fake_vllm.install(monkeypatch)
    adapter = make_adapter(tiny_model, tmp_path / "alpha", seed=1)
    answers = []

    def run(server, sockets=None) -> None:
        with TestClient(server.config.app) as client:
            answers.append(client.post("/v1/chat/completions", json={"model": "alpha", "messages": QUESTION,
                                                                     "max_tokens": 4, "temperature": 0}))

    monkeypatch.setattr(GracefulServer, "run", run)
    assert main(["serve", "--engine", "vllm", "--model", str(tiny_model), "--adapter", f"alpha={adapter}",
                 "--no-monitor", "--max-batch-size", "4", "--max-prompt-tokens", "3000"]) == 0
    fake = fake_vllm.AsyncLLMEngine.built[-1]
    assert answers[0].status_code == 200 and answers[0].json()["choices"][0]["message"]["role"] == "assistant"
    args = fake.args
    assert (args.model, args.dtype, args.trust_remote_code, args.max_num_seqs) == (str(tiny_model), "float32", False, 4)
    assert args.max_model_len == 2048  # 3000 + 2048 asked, capped by the model's max_position_embeddings
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 1, 8)
    assert fake.calls[-1].lora_request.lora_name == "alpha" and fake.shut_down


def test_lora_engine_args_size_the_rank_and_refuse_what_vllm_cannot_serve(tmp_path):
    def adapter(name: str, **config) -> str:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, **config}))
        (directory / "adapter_model.safetensors").write_bytes(b"")
        return str(directory)

    assert lora_engine_args({}) == {"enable_lora": False}
    assert lora_engine_args({"a": adapter("a"), "b": adapter("b", r=16, rank_pattern={"q_proj": 40})}) == \
        {"enable_lora": True, "max_loras": 2, "max_lora_rank": 64}
    for name, config, message in (("dora", {"use_dora": True}, "DoRA"),
                                  ("saved", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                  ("ia3", {"peft_type": "IA3"}, "IA3"),
                                  ("huge", {"r": 1024}, "largest max_lora_rank 512")):
        with pytest.raises(TunelabError, match=message):
            lora_engine_args({name: adapter(name, **config)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="not a PEFT adapter directory"):
        lora_engine_args({"empty": str(tmp_path / "empty")})
