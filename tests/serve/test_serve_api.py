"""The OpenAI surface real clients use: refused fields, token-id prompts, log-probs, structured output, tools,
usage in streams, penalties and logit bias; against one in-thread server on the tiny model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
from live_server import QUESTION, LiveServer

from tunelab.data.templates import resolve_template
from tunelab.models.load import generation_stop_ids, load_with_adapters
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import GenerationEngine

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "age", "tags", "mood"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def api(tiny_model):
    model, tokenizer = load_with_adapters(str(tiny_model), {}, torch.device("cpu"))
    engine = GenerationEngine(model, tokenizer, max_batch_size=16, max_wait_ms=20, max_queue=128)
    settings = ServeSettings(model_name="tiny", max_tokens_limit=256, default_max_tokens=16, timeout=60,
                             context_length=2048, max_body_bytes=1 << 20)
    app = create_app(engine, resolve_template(tokenizer, "auto"), generation_stop_ids(model.generation_config, tokenizer),
                     settings)
    live = LiveServer(app)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=120)
    yield {"url": live.url, "client": client, "tokenizer": tokenizer, "model": model, "engine": engine}
    live.close()
    engine.close()


def post(api, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{api['url']}{path}", json=body, timeout=60)


@pytest.mark.parametrize(("endpoint", "field", "value"), [
    ("chat", "n", 2), ("chat", "audio", {"voice": "alloy", "format": "mp3"}), ("chat", "modalities", ["audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}), ("chat", "functions", [{"name": "f"}]),
    ("chat", "store", True), ("chat", "reasoning_effort", "high"), ("chat", "top_k", 5),
    ("chat", "stream_options", {"include_usage": True}),
    ("completions", "best_of", 3), ("completions", "suffix", "tail"), ("completions", "n", 2),
    ("completions", "guided_json", {}),
])
def test_unsupported_fields_are_refused_by_name(api, endpoint, field, value):
    body = {"model": "tiny", "max_tokens": 2, field: value}
    body.update({"messages": QUESTION} if endpoint == "chat" else {"prompt": "The cat"})
    response = post(api, "/v1/chat/completions" if endpoint == "chat" else "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("field", "value"), [("temperature", 2.5), ("top_p", 0), ("presence_penalty", 3),
                                              ("frequency_penalty", -2.5), ("seed", 2**64), ("top_logprobs", 21),
                                              ("logit_bias", {"99999": 1}), ("logit_bias", {"5": 101}),
                                              ("stop", ["x"] * 17), ("stop", "y" * 1001)])
def test_out_of_range_values_are_400_naming_the_field(api, field, value):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 2, "logprobs": True, field: value}
    response = post(api, "/v1/chat/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_token_id_prompts(api):
    tokenizer = api["tokenizer"]
    ids = tokenizer("The cat sat")["input_ids"]
    as_text = post(api, "/v1/completions", {"model": "tiny", "prompt": "The cat sat", "max_tokens": 6, "temperature": 0})
    as_ids = post(api, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0})
    nested = post(api, "/v1/completions", {"model": "tiny", "prompt": [ids], "max_tokens": 6, "temperature": 0})
    assert as_text.json()["choices"][0]["text"] == as_ids.json()["choices"][0]["text"] == \
        nested.json()["choices"][0]["text"]
    assert as_ids.json()["usage"]["prompt_tokens"] == len(ids)
    two = post(api, "/v1/completions", {"model": "tiny", "prompt": [ids, ids], "max_tokens": 2})
    assert two.status_code == 400 and "one prompt per request" in two.json()["error"]["message"]
    outside = post(api, "/v1/completions", {"model": "tiny", "prompt": [1, 10**6], "max_tokens": 2})
    assert outside.status_code == 400 and "1000000" in outside.json()["error"]["message"]
    floats = post(api, "/v1/completions", {"model": "tiny", "prompt": [1.5, 2], "max_tokens": 2})
    assert floats.status_code == 400 and floats.json()["error"]["param"] == "prompt"


def test_completion_logprobs_with_echo_equal_the_model(api):
    tokenizer, model = api["tokenizer"], api["model"]
    ids = tokenizer("The cat sat on the mat")["input_ids"]
    reply = post(api, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 1, "logprobs": 1,
                                          "echo": True, "temperature": 0}).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    assert reply["choices"][0]["text"].startswith(tokenizer.decode(ids))
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for position in range(1, len(ids)):
        assert logprobs["token_logprobs"][position] == pytest.approx(float(expected[position - 1, ids[position]]),
                                                                     abs=1e-4)
        top = logprobs["top_logprobs"][position]  # the chosen token and the most likely one
        assert max(top.values()) == pytest.approx(float(expected[position - 1].max()), abs=1e-4)
    generated = int(expected[-1].argmax())
    assert logprobs["token_logprobs"][-1] == pytest.approx(float(expected[-1, generated]), abs=1e-4)
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    scored = post(api, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 0, "logprobs": 0,
                                           "echo": True}).json()
    assert scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][:-1]


def test_chat_logprobs_and_top_logprobs(api):
    client = api["client"]
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the chosen is the top one
    assert "".join(e.token for e in content).strip() == reply.choices[0].message.content.strip()
    streamed = [c for c in client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5,
                                                          temperature=0, logprobs=True, stream=True)]
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_stream_usage_penalties_and_logit_bias(api):
    client, tokenizer = api["client"], api["tokenizer"]
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert all(c.usage is None for c in chunks[:-1])
    forced = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" sun"))[-1]
    biased = client.completions.create(model="tiny", prompt="The cat", max_tokens=5, temperature=0,
                                       logit_bias={str(forced): 100})
    assert biased.choices[0].text == tokenizer.decode([forced] * 5)
    plain = client.completions.create(model="tiny", prompt="The cat", max_tokens=24, temperature=0)
    penalised = client.completions.create(model="tiny", prompt="The cat", max_tokens=24, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    repeats = lambda text: len(ids(text)) - len(set(ids(text)))  # noqa: E731
    assert penalised.choices[0].text != plain.choices[0].text
    assert repeats(penalised.choices[0].text) < max(repeats(plain.choices[0].text), 1)


def test_json_schema_answers_validate_50_of_50(api):
    client = api["client"]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(seed: int) -> str:
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=1.0,
            seed=seed, max_tokens=200, response_format=response_format).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(50)))
    for answer in answers:
        jsonschema.validate(json.loads(answer), PERSON)
    assert len(set(answers)) > 10  # sampled answers, not one repeated
    anything = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=200, temperature=0.7, seed=0,
                                              response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    bad = post(api, "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"$ref": "#/nowhere"}}}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_forced_tool_calls_stream_and_tool_results(api):
    client = api["client"]
    messages = [{"role": "user", "content": "What is the weather in Paris this week?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    required = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=80,
                                              tool_choice="required", temperature=0.8, seed=4)
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=80,
                                                tool_choice="required", stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    follow_up = messages + [choice.message.model_dump(exclude_none=True),
                            {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}]
    answer = client.chat.completions.create(model="tiny", messages=follow_up, tools=[WEATHER], max_tokens=8,
                                            tool_choice="none", temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    before = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=1,
                                            tool_choice="none")
    rendered_call = len(api["tokenizer"](call.function.arguments + '{"forecast": "sunny"}')["input_ids"])
    assert answer.usage.prompt_tokens >= before.usage.prompt_tokens + rendered_call  # the call and its result


def test_tokenizer_endpoints(api):
    tokenizer = api["tokenizer"]
    info = httpx.get(f"{api['url']}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == 2048
    ids = post(api, "/tokenize", {"prompt": "The cat", "add_special_tokens": False}).json()["tokens"]
    assert ids == tokenizer("The cat", add_special_tokens=False)["input_ids"]
    assert post(api, "/detokenize", {"tokens": ids}).json()["prompt"] == "The cat"
