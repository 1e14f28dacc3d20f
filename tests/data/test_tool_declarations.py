"""Tool-call records train on the declaration the server writes: glaive's ``tools`` field is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from tunelab.data.files import read_rows
from tunelab.data.records import Conversation, record_to_json
from tunelab.data.readers import load_prompts, load_records
from tunelab.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, render_conversation
from tunelab.data.tool_declarations import parse_tools
from tunelab.errors import DataError
from tunelab.serve.protocol import ChatMessage, Tool
from tunelab.serve.tools import render_chat

GLAIVE = SHARED_DATA / "llamafactory_demo" / "glaive_toolcall_en_demo.json"
NATIVE_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def glaive_with_a_call() -> Conversation:
    records, report = load_records([str(GLAIVE)], fmt="sharegpt", on_error="fail")
    assert report.kept == 300
    return next(r for r in records if r.tools and any(m["content"].startswith('{"name"') for m in r.messages))


def server_prompt(tokenizer, template: str, record: Conversation, upto: int) -> str:
    """What ``tunelab serve`` renders for the conversation's first ``upto`` messages and its tools."""
    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in record.messages[:upto]]
    return render_chat(tokenizer, template, messages, [Tool.model_validate(t) for t in record.tools])


@pytest.mark.parametrize("template", [BUILTIN_TEMPLATES["chatml"], NATIVE_TEMPLATE], ids=["system-message", "native"])
def test_the_trained_prompt_before_a_tool_call_is_what_the_server_sends(tokenizer, template):
    record = glaive_with_a_call()
    call_turn = next(i for i, m in enumerate(record.messages) if m["content"].startswith('{"name"'))
    rendered = render_conversation(tokenizer, template, record.messages, "assistant", {tokenizer.eos_token_id},
                                   tools=record.tools)
    served = server_prompt(tokenizer, template, record, call_turn)
    assert rendered.text.startswith(served)
    assert record.tools[0]["function"]["name"] in served
    # the call itself is trained, the declaration and the first question are not
    first_question = len(tokenizer(server_prompt(tokenizer, template, record, 1), add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in rendered.labels[:first_question])
    trained = tokenizer.decode([label for label in rendered.labels if label != IGNORE_INDEX])
    assert record.messages[call_turn]["content"] in trained and "You can call" not in trained


def test_all_glaive_records_keep_their_tools_and_round_trip(tmp_path: Path):
    records, _ = load_records([str(GLAIVE)], fmt="sharegpt", on_error="fail")
    raw = json.loads(GLAIVE.read_text())
    with_tools = [r for r in raw if json.loads(r.get("tools") or "[]")]
    assert sum(bool(r.tools) for r in records) == len(with_tools) == 191
    out = tmp_path / "canonical.jsonl"
    out.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in records))
    again, _ = load_records([str(out)], on_error="fail")
    assert [r.tools for r in again] == [r.tools for r in records]
    prompts, _ = load_prompts([str(out)], on_error="fail")
    assert [p.tools for p in prompts] == [r.tools for r in records]


def test_tools_come_as_a_json_text_a_list_or_openai_objects():
    spec = {"name": "f", "parameters": {"type": "object"}}
    assert parse_tools(json.dumps([spec])) == parse_tools([spec]) == parse_tools([{"type": "function", "function": spec}])
    assert parse_tools("") == parse_tools(None) == []


@pytest.mark.parametrize("tools, message", [
    ("[{\"name\": ", "'tools' is not valid JSON"),
    ({"name": "f"}, "'tools' must be a list"),
    ([{"description": "no name"}], "'tools' item 0 has no function name"),
])
def test_a_bad_tools_field_names_the_file_and_line(tmp_path: Path, tools, message):
    path = tmp_path / "calls.jsonl"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tools": tools}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: {message}"):
        load_records([str(path)], on_error="fail")
    records, report = load_records([str(path)], on_error="skip")
    assert len(records) == 1 and sum(report.skipped.values()) == 1
    assert len(list(read_rows(str(path)))) == 2


def test_a_model_trained_on_declared_tools_calls_one_by_itself_when_served(tiny_model, tmp_path: Path):
    """tool_choice auto, end to end: train on glaive calls, serve, and the model chooses to call."""
    import openai
    import torch
    from live_server import LiveServer

    from conftest import make_config, write_config
    from tunelab.cli import main
    from tunelab.data.templates import resolve_template
    from tunelab.models.load import generation_stop_ids, load_with_adapters
    from tunelab.serve.app import ServeSettings, create_app
    from tunelab.serve.engine import GenerationEngine

    rows = [r for r in json.loads(GLAIVE.read_text()) if r["conversations"][1]["from"] == "function_call"][:2]
    calls = [{"conversations": r["conversations"][:2], "tools": r["tools"]} for r in rows]
    data = tmp_path / "calls.json"
    data.write_text(json.dumps(calls))
    config = make_config(tmp_path, tiny_model, data, method={"type": "full"}, data={"train": str(data), "max_length": 1024},
                         train={"max_steps": 80, "lr": 1e-2, "schedule": "constant", "batch_tokens": 4096})
    assert main(["train", str(write_config(tmp_path, config))]) == 0
    model, tokenizer = load_with_adapters(str(tmp_path / "out" / "final"), {}, torch.device("cpu"))
    engine = GenerationEngine(model, tokenizer, max_batch_size=4, max_wait_ms=5, max_queue=8)
    settings = ServeSettings(model_name="tiny", max_tokens_limit=256, default_max_tokens=128, timeout=120,
                             context_length=2048, max_body_bytes=1 << 20)
    live = LiveServer(create_app(engine, resolve_template(tokenizer, "auto"),
                                 generation_stop_ids(model.generation_config, tokenizer), settings))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=120)
        for row in rows:
            expected = json.loads(row["conversations"][1]["value"])
            tools = [{"type": "function", "function": f} for f in json.loads(row["tools"])]
            reply = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": row["conversations"][0]["value"]}],
                tools=tools, tool_choice="auto", max_tokens=128, temperature=0)
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls", choice.message.content
            call = choice.message.tool_calls[0].function
            assert call.name == expected["name"] and json.loads(call.arguments) == expected["arguments"]
    finally:
        live.close()
        engine.close()
