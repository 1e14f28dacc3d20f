"""tunelab verify: an adapter, its merge, GGUF, ONNX and a running server answer alike; broken exports fail.

The tiny adapter is a LoRA with random (non-zero) weights on the tiny Llama, so it changes the
model; its generation config adds a stop token the model often produces, so that answers end
with a stop token in every format and a lost stop token shows.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from tunelab.deploy.parity import load_parity_prompts, parse_model_spec, parse_overrides, run_gate
from tunelab.deploy.parity.backends import LLAMA_CPP_MISSING
from tunelab.deploy.parity.specs import ModelSpec
from tunelab.deploy.parity.thresholds import THRESHOLDS, pair_class, thresholds_for
from tunelab.errors import TunelabError

pytest.importorskip("gguf")
PROMPTS = ["What is 4 + 5?", "Name a colour.", "Dev has 18 balloons and gives away 2. How many are left?",
           "Say hello.", "Write one word about the sea.", "Count to three."]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exports(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """adapter, merged, f32 and q8_0 GGUF files, an ONNX export, the prompts file and a server's URL."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tunelab.deploy.gguf import export_gguf
    from tunelab.deploy.merge import merge_adapter
    from tunelab.deploy.onnx import export_onnx

    root = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False)).eval()
    # A stop token the model produces: the commonest token of its greedy answers (besides the prompt's own).
    generated: collections.Counter = collections.Counter()
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        generated.update(out[0, ids.shape[1] + 2:].tolist())
    stop = generated.most_common(1)[0][0]
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, stop],
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(adapter)
    merged = merge_adapter(adapter, root / "merged")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    paths = {"adapter": adapter, "merged": merged, "prompts": prompts, "stop": stop,
             "f32": export_gguf(merged, root / "m-f32.gguf", outtype="f32"),
             "q8_0": export_gguf(merged, root / "m-q8_0.gguf", outtype="q8_0"),
             "onnx": export_onnx(merged, root / "onnx")}
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", str(merged), "--port", str(port),
                               "--no-monitor"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"tunelab serve did not start: {server.stderr.read()[-2000:]}")
        time.sleep(0.2)
    paths["url"] = f"http://127.0.0.1:{port}/v1"
    yield paths
    server.terminate()
    server.wait(timeout=30)


def test_every_format_answers_like_the_adapter(exports, tmp_path):
    report = tmp_path / "report.json"
    result = run_cli("verify", "--model", f"adapter:{exports['adapter']}", "--model", f"merged=hf:{exports['merged']}",
                     "--model", f"f32={exports['f32']}", "--model", f"q8={exports['q8_0']}",
                     "--model", f"onnx:{exports['onnx']}", "--model", f"served=url:{exports['url']}",
                     "--prompts", str(exports["prompts"]), "--max-new-tokens", "12", "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity: pass" in result.stdout and "| pass" not in result.stdout
    summary = json.loads(report.read_text())
    rows = {(c["name"], c["reader"]): c for c in summary["comparisons"]}
    assert summary["passed"] and summary["prompts"] == len(PROMPTS)
    assert 0 < summary["reference_stops"] < len(PROMPTS)  # some answers stop, some run to the limit
    for key in [("merged", "transformers"), ("f32", "transformers"), ("q8", "transformers"),
                ("onnx:onnx", "onnxruntime"), ("served", "http")]:
        row = rows[key]
        assert row["passed"] and row["same_answers"] == row["same_stops"] == len(PROMPTS), key
        assert row["prompt_tokens_equal"] == row["prompt_tokens_checked"] == len(PROMPTS), key
    assert rows[("merged", "transformers")]["max_abs_logit"] < 1e-4
    assert rows[("f32", "transformers")]["klass"] == "f32" and rows[("f32", "transformers")]["max_abs_logit"] < 1e-4
    assert rows[("q8", "transformers")]["klass"] == "q8_0" and 0 < rows[("q8", "transformers")]["max_abs_logit"] < 0.1
    assert rows[("onnx:onnx", "onnxruntime")]["max_abs_logit"] < 1e-4
    assert rows[("served", "http")]["max_abs_logit"] is None and rows[("served", "http")]["klass"] == "served"
    llama_cpp = rows[("f32", "llama.cpp")]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert llama_cpp["skipped"] == LLAMA_CPP_MISSING and "skipped" in result.stdout
    else:
        assert llama_cpp["passed"] and llama_cpp["same_answers"] == len(PROMPTS)


def test_the_llama_cpp_reader_drives_llama_cpp_python(exports, monkeypatch):
    """tunelab's llama.cpp path against a stand-in with llama-cpp-python's API (tests/support/fake_llama_cpp.py)."""
    import fake_llama_cpp

    fake_llama_cpp.install(monkeypatch)
    prompts = load_parity_prompts(exports["prompts"])
    result = run_gate([_spec("adapter", "adapter", exports["adapter"]), _spec("q8", "gguf", exports["q8_0"])],
                      prompts, max_new_tokens=12, gguf_readers=("llama.cpp",), show_progress=False)
    row = result.comparisons[0]
    assert row.reader == "llama.cpp" and row.klass == "q8_0" and result.passed, row.failures
    assert row.prompt_tokens_equal == row.prompt_tokens_checked == len(prompts)
    assert row.same_stops == len(prompts) and 0 < row.max_abs_logit < 0.1


def _spec(name: str, kind: str, path: Path) -> ModelSpec:
    return ModelSpec(name, kind, str(path))


def test_an_export_that_lost_a_stop_token_fails(exports, tmp_path, monkeypatch):
    from tunelab.deploy.gguf import export_gguf, tokenizer as gguf_tokenizer

    original = gguf_tokenizer._special_ids

    def without_eom(*args):  # the third stop id of generation_config.json is written as eom: drop it
        ids, notes = original(*args)
        return {k: v for k, v in ids.items() if k != "eom"}, notes

    monkeypatch.setattr(gguf_tokenizer, "_special_ids", without_eom)
    broken = export_gguf(exports["merged"], tmp_path / "no-eom.gguf", outtype="f32")
    monkeypatch.undo()
    prompts = load_parity_prompts(exports["prompts"])
    result = run_gate([_spec("adapter", "adapter", exports["adapter"]), _spec("gguf", "gguf", broken)], prompts,
                      max_new_tokens=12, gguf_readers=("transformers",), show_progress=False)
    gguf = result.comparisons[0]
    assert not result.passed and gguf.max_abs_logit < 1e-4  # same weights, same logits ...
    assert gguf.same_stops < len(prompts)  # ... but it talks on where the reference stops
    assert any(f.startswith("same stop") for f in gguf.failures)
    assert gguf.first_difference["reference_stop"] == exports["stop"] and gguf.first_difference["stop"] is None


def test_another_model_and_another_chat_template_fail(exports, tiny_model, tmp_path):
    from tunelab.deploy.gguf import export_gguf
    from tunelab.models.tiny import create_tiny_model

    other = create_tiny_model(tmp_path / "other", hidden=64, layers=2, heads=4, kv_heads=2, seed=1)
    wrong_weights = export_gguf(other, tmp_path / "other.gguf", outtype="f32")
    templated = tmp_path / "templated"
    shutil.copytree(exports["merged"], templated)
    template = templated / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    prompts = load_parity_prompts(exports["prompts"])
    result = run_gate([_spec("merged", "hf", exports["merged"]), _spec("other", "gguf", wrong_weights),
                       _spec("templated", "hf", templated)], prompts, max_new_tokens=8,
                      gguf_readers=("transformers",), show_progress=False)
    other_row, templated_row = result.comparisons
    assert not result.passed
    assert other_row.max_abs_logit > 0.1 and any("max |Δlogit|" in f for f in other_row.failures)
    assert templated_row.prompt_tokens_equal == 0 and templated_row.max_abs_logit < 1e-4
    assert templated_row.failures[0].startswith("prompt tokens differ on 6 of 6 prompts")


def test_export_runs_the_gate_as_a_step(exports, tmp_path):
    result = run_cli("export", "--format", "gguf", "--model", str(exports["merged"]), "--out", str(tmp_path / "x.gguf"),
                     "--outtype", "f16", "--prompts", str(exports["prompts"]), "--limit", "3",
                     "--max-new-tokens", "8", "--gguf-reader", "transformers")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified by reading it back" in result.stdout and "parity with hf:merged: 3 prompts" in result.stdout
    assert "gguf:x.gguf" in result.stdout and "parity: pass" in result.stdout


def test_model_specs_name_kinds_and_detect_them(exports, tmp_path):
    assert parse_model_spec(f"adapter:{exports['adapter']}") == ModelSpec("adapter:adapter", "adapter",
                                                                          str(exports["adapter"]))
    assert parse_model_spec(str(exports["merged"])).kind == "hf"
    assert parse_model_spec(str(exports["onnx"])).kind == "onnx"
    assert parse_model_spec(f"q={exports['q8_0']}") == ModelSpec("q", "gguf", str(exports["q8_0"]))
    assert parse_model_spec(exports["url"]).kind == "url"
    assert parse_model_spec(f"s=url:{exports['url']}#tiny").location.endswith("/v1#tiny")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for text, message in [
        (f"safetensors:{exports['merged']}", "unknown kind 'safetensors'; one of: adapter:DIR"),
        (str(tmp_path / "missing"), "not found"),
        (str(tmp_path / "empty"), "a directory with no adapter_config.json, onnx_export.json or config.json"),
        (str(tmp_path / "notes.txt"), "a file that is not GGUF; name its kind"),
        (f"gguf:{tmp_path / 'missing.gguf'}", "file not found"),
        (f"hf:{exports['f32']}", "directory not found"),
        ("url:ftp://x", "expected http://HOST:PORT/v1"),
    ]:
        with pytest.raises(TunelabError, match=message):
            parse_model_spec(text)


def test_gate_refuses_what_it_cannot_compare(exports):
    prompts = [[{"role": "user", "content": "hi"}]]
    merged = _spec("m", "hf", exports["merged"])
    with pytest.raises(TunelabError, match="at least two --model"):
        run_gate([merged], prompts)
    with pytest.raises(TunelabError, match="--max-new-tokens 0: must be at least 1"):
        run_gate([merged, _spec("a", "adapter", exports["adapter"])], prompts, max_new_tokens=0)
    with pytest.raises(TunelabError, match="names repeat"):
        run_gate([merged, merged], prompts)
    with pytest.raises(TunelabError, match="must be an adapter, hf or onnx model, not gguf"):
        run_gate([_spec("g", "gguf", exports["f32"]), merged], prompts)
    with pytest.raises(TunelabError, match="cannot reach the server"):
        run_gate([merged, ModelSpec("s", "url", f"http://127.0.0.1:{_free_port()}/v1#x")], prompts,
                 show_progress=False)


def test_prompt_files(tmp_path):
    messages, alpaca = tmp_path / "messages.jsonl", tmp_path / "alpaca.json"
    messages.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello!"}]}) + "\n")
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    assert load_parity_prompts(messages) == [[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}]]
    prompt = load_parity_prompts(alpaca)[0]
    assert prompt[-1]["role"] == "user" and "2 and 3" in prompt[-1]["content"]
    assert load_parity_prompts(REPO / "examples" / "data" / "parity_prompts.txt", limit=2) == [
        [{"role": "user", "content": "Who are you?"}],
        [{"role": "user", "content": "What is your name, and who made you?"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n{\"nothing\": 1}\n")
    with pytest.raises(TunelabError, match=r"bad.jsonl:2") as error:
        load_parity_prompts(bad)
    assert "data.on_error" not in str(error.value)  # a training config's fix does not apply here
    with pytest.raises(TunelabError, match="--limit 0: must be at least 1"):
        load_parity_prompts(bad, limit=0)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TunelabError, match="no prompts"):
        load_parity_prompts(tmp_path / "empty.txt")


def test_thresholds_per_class_and_overrides():
    assert pair_class("f32", "q8_0") == "q8_0" and pair_class("bf16", "f16") == "bf16"
    assert pair_class("f32", "served") == "served"
    assert THRESHOLDS["f32"].min_answers == THRESHOLDS["f16"].min_answers == 1.0
    assert THRESHOLDS["q8_0"].max_abs_logit > THRESHOLDS["f16"].max_abs_logit > THRESHOLDS["f32"].max_abs_logit
    overrides = parse_overrides(["q8_0.min_answers=0.9", "my-gguf.max_abs_logit=3"])
    assert thresholds_for("q8_0", "other", overrides).min_answers == 0.9
    limits = thresholds_for("q8_0", "my-gguf", overrides)
    assert limits.max_abs_logit == 3.0 and limits.min_answers == 0.9
    for item, message in [("q8_0=1", "expected CLASS_OR_NAME.METRIC=VALUE"), ("q8_0.speed=1", "unknown metric 'speed'"),
                          ("q8_0.min_top1=high", "'high' is not a number")]:
        with pytest.raises(TunelabError, match=message):
            parse_overrides([item])
