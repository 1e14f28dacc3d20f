"""A real ``tunelab serve`` process: lm-evaluation-harness against it equals its own ``hf`` model, and SIGTERM
stores every record and closes the serve run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import SHARED_DATA, make_config, write_config

from tunelab.cli import main

from tunelab.monitor.store import read_meta, read_requests
from tunelab.track.registry import Registry

TASKS = Path(__file__).resolve().parents[1] / "support" / "lm_eval_tasks"
GLAIVE = SHARED_DATA / "llamafactory_demo" / "glaive_toolcall_en_demo.json"


def start_serve(model: Path, db: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``tunelab serve --port 0``; returns the process and the URL from its ready line."""
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", str(model), "--name", "tiny",
                                "--port", "0", "--monitor-db", str(db), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # the ready line: "tunelab serve: tiny ready at http://127.0.0.1:PORT"
    if "ready at" not in line:
        process.kill()
        raise AssertionError(f"no ready line: {line!r} {process.stderr.read()[-2000:]}")
    return process, line.split("ready at ")[1].strip()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """One ``tunelab serve`` for the module: the tiny model, and as ``glaive`` a LoRA fine-tuned on tool calls."""
    work = tmp_path_factory.mktemp("serve-cli")
    config = make_config(work, tiny_model, GLAIVE, train={"max_steps": 4, "lr": 3e-3, "batch_tokens": 2048,
                                                          "log_every": 1, "seed": 0}, data={"max_length": 512})
    assert main(["train", str(write_config(work, config))]) == 0
    db = work / "requests.db"
    process, url = start_serve(tiny_model, db, "--max-tokens-limit", "128", "--adapter", f"glaive={work / 'out' / 'final'}")
    yield {"process": process, "url": url, "db": db, "model": tiny_model}
    if process.poll() is None:
        process.kill()
        process.wait()


def lm_eval_samples(model: str, model_args: dict, tasks_dir: Path) -> dict:
    """Run both local tasks with lm-evaluation-harness; per-task samples keyed by doc id."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=["tunelab_arith_gen", "tunelab_arith_mc"],
                              task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                              batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              fewshot_random_seed=0)
    return {"results": results["results"],
            "samples": {task: {s["doc_id"]: s for s in samples} for task, samples in results["samples"].items()}}


def test_lm_eval_local_completions_equals_its_hf_model(served, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    for name in ("arith_gen.yaml", "arith_mc.yaml"):  # point data_files at the copy (datasets reads relative to cwd)
        path = tasks / name
        path.write_text(path.read_text().replace("arith.json", str(tasks / "arith.json")))
    # local-completions with its defaults: token-id prompts, echo + logprobs=1 for log-likelihoods, the
    # server's /tokenizer_info and /tokenize as its tokenizer
    served_run = lm_eval_samples("local-completions", {"model": "tiny", "base_url": f"{served['url']}/v1/completions"},
                                 tasks)
    hf_run = lm_eval_samples("hf", {"pretrained": str(served["model"]), "dtype": "float32", "device": "cpu"}, tasks)
    gen_a, gen_b = served_run["samples"]["tunelab_arith_gen"], hf_run["samples"]["tunelab_arith_gen"]
    assert len(gen_a) == 12 and [gen_a[i]["resps"] for i in gen_a] == [gen_b[i]["resps"] for i in gen_a]
    mc_a, mc_b = served_run["samples"]["tunelab_arith_mc"], hf_run["samples"]["tunelab_arith_mc"]
    for doc in mc_a:
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in mc_a[doc]["resps"]),
                                                      (r[0] for r in mc_b[doc]["resps"])):
            assert float(ll_a) == pytest.approx(float(ll_b), abs=1e-4) and bool(greedy_a) == bool(greedy_b)
    for task, metric in (("tunelab_arith_gen", "exact_match,none"), ("tunelab_arith_mc", "acc,none")):
        assert served_run["results"][task][metric] == pytest.approx(hf_run["results"][task][metric], abs=1e-4)


def bounded(schema: dict) -> dict:
    """The schema with its strings and arrays bounded, so a sampled call always ends within max_tokens."""
    schema = dict(schema)
    if schema.get("type") == "string":
        schema.setdefault("maxLength", 12)
    if schema.get("type") == "array":
        schema.setdefault("maxItems", 3)
    for key in ("items",):
        if isinstance(schema.get(key), dict):
            schema[key] = bounded(schema[key])
    if isinstance(schema.get("properties"), dict):
        schema["properties"] = {name: bounded(value) for name, value in schema["properties"].items()}
        schema.setdefault("additionalProperties", False)
    return schema


def test_a_model_fine_tuned_on_tool_calls_answers_the_openai_tools_api(served):
    """glaive's tool-call conversations, trained with tunelab, then called through the openai client."""
    rows = json.loads(GLAIVE.read_text(encoding="utf-8"))
    row = next(r for r in rows if r["tools"] and any(t["from"] == "function_call" for t in r["conversations"]))
    functions = [{**f, "parameters": bounded(f["parameters"])} for f in json.loads(row["tools"])]
    tools = [{"type": "function", "function": f} for f in functions]
    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": row["conversations"][0]["value"]}]
    reply = client.chat.completions.create(model="glaive", messages=messages, tools=tools, max_tokens=128,
                                           tool_choice={"type": "function", "function": {"name": functions[0]["name"]}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == functions[0]["name"]
    jsonschema.validate(json.loads(call.function.arguments), functions[0]["parameters"])
    streamed = {"name": "", "arguments": ""}
    for chunk in client.chat.completions.create(model="glaive", messages=messages, tools=tools, max_tokens=128,
                                                tool_choice="required", stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            streamed["name"] += delta.function.name or ""
            streamed["arguments"] += delta.function.arguments or ""
    assert streamed["name"] in {f["name"] for f in functions} and isinstance(json.loads(streamed["arguments"]), dict)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": row["conversations"][2]["value"]
                  if row["conversations"][2]["from"] == "observation" else '{"result": "done"}'}]
    answer = client.chat.completions.create(model="glaive", messages=messages, tools=tools, max_tokens=16,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > reply.usage.prompt_tokens  # the call and its result went into the prompt


def test_sigterm_stores_every_record_and_closes_the_run(served):
    process, url, db = served["process"], served["url"], served["db"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32, "temperature": 0}
    def ask() -> int | str:
        try:
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code
        except httpx.TransportError:  # arrived after the listening socket closed
            return "refused"

    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(ask) for _ in range(16)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "tunelab_batches_total 0" in httpx.get(f"{url}/metrics").text:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # while requests are in flight
        statuses = [a.result() for a in answers]
    assert process.wait(timeout=120) == 0  # a graceful exit, not 143
    answered = statuses.count(200)
    assert answered >= 1 and set(statuses) <= {200, 503, "refused"}
    rows = read_requests(db, since=started)
    chat_rows = [s for s, e in zip(rows.status.tolist(), rows.endpoint) if e == "chat"]
    assert chat_rows.count(200) == answered  # every answered request is in the store
    assert Registry().get(read_meta(db)["serve_run_id"])["status"] == "stopped"
