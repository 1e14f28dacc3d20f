"""``--config RUN.yaml`` on merge, export, serve and data stats: the run's models and data, explicit options win.

(``data convert|clean|split --config``: test_data_config.py; a bad or missing config is tested here for all.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import ALPACA_DEMO, make_config, run_cli, write_config
from safetensors.torch import load_file

from tunelab.cli import main
from tunelab.cli.serve import _serve_config_run


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two trained runs of 2 steps each: ``lora`` (an adapter) and ``full`` (a whole model), by config path."""
    work = tmp_path_factory.mktemp("config-flag")
    configs = {}
    for method in ("lora", "full"):
        config = make_config(work / method, tiny_model, ALPACA_DEMO, method={"type": method},
                             train={"max_steps": 2, "lr": 1e-2})
        (work / method).mkdir()
        configs[method] = write_config(work / method, config)
        assert main(["train", str(configs[method])]) == 0
    return configs


def _final(config_path) -> str:
    return str(config_path.parent / "out" / "final")


def test_merge_config_equals_merge_adapter_and_base(runs, tiny_model, tmp_path):
    assert main(["merge", "--config", str(runs["lora"]), "--out", str(tmp_path / "by-config")]) == 0
    assert main(["merge", "--adapter", _final(runs["lora"]), "--base", str(tiny_model),
                 "--out", str(tmp_path / "explicit")]) == 0
    by_config = load_file(tmp_path / "by-config" / "model.safetensors")
    explicit = load_file(tmp_path / "explicit" / "model.safetensors")
    assert by_config.keys() == explicit.keys()
    assert all(torch.equal(by_config[name], explicit[name]) for name in explicit)
    base = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(explicit[name], base[name]) for name in base if name in explicit)  # the adapter mattered


def test_merge_config_of_a_full_run_says_there_is_no_adapter(runs, tmp_path, capsys):
    assert main(["merge", "--config", str(runs["full"]), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "a full run saves a whole model, there is no adapter to merge" in err
    assert not (tmp_path / "m").exists()


def test_export_config_refuses_an_adapter_run_with_what_to_do(runs, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert main(["export", "--config", str(runs["lora"]), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"merge it first (tunelab merge --config {runs['lora']} --out DIR), then pass --model DIR" in err
    assert not out.exists()


def test_export_config_of_a_full_run_exports_its_final_model_and_explicit_model_wins(runs, tmp_path):
    by_config, explicit = tmp_path / "by-config.gguf", tmp_path / "explicit.gguf"
    assert main(["export", "--config", str(runs["full"]), "--format", "gguf", "--outtype", "f32", "--no-verify",
                 "--out", str(by_config)]) == 0
    assert main(["export", "--model", _final(runs["full"]), "--format", "gguf", "--outtype", "f32", "--no-verify",
                 "--out", str(explicit)]) == 0
    assert by_config.read_bytes() == explicit.read_bytes()
    # An explicit --model wins over the config (here over the adapter run's refusal).
    wins = tmp_path / "wins.gguf"
    assert main(["export", "--config", str(runs["lora"]), "--model", _final(runs["full"]), "--format", "gguf",
                 "--outtype", "f32", "--no-verify", "--out", str(wins)]) == 0
    assert wins.read_bytes() == explicit.read_bytes()


def _serve_args(*argv: str) -> argparse.Namespace:
    from tunelab.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_serve_config_resolves_the_run_and_explicit_model_wins(runs, tiny_model):
    full = _serve_args("--config", str(runs["full"]))
    _serve_config_run(full)
    assert full.model == _final(runs["full"]) and full.adapter is None
    lora = _serve_args("--config", str(runs["lora"]), "--adapter", f"other={_final(runs['lora'])}")
    _serve_config_run(lora)
    assert lora.model == str(tiny_model)
    assert lora.adapter == [f"other={_final(runs['lora'])}", f"out={_final(runs['lora'])}"]
    explicit = _serve_args("--config", str(runs["lora"]), "--model", _final(runs["full"]))
    _serve_config_run(explicit)
    assert explicit.model == _final(runs["full"]) and explicit.adapter is None


def test_serve_config_answers_a_request_with_the_runs_adapter(runs, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--config", str(runs["lora"]),
                                "--port", "0", "--no-monitor"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = process.stdout.readline()
        assert "ready at" in line, process.stderr.read()[-2000:] if process.poll() is not None else line
        url = line.split("ready at ")[1].strip()
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert "out" in {model["id"] for model in models["data"]}
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                            json={"model": "out", "messages": [{"role": "user", "content": "Say hi."}],
                                  "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "out" and answer.json()["choices"][0]["message"]["content"] is not None
    finally:
        process.terminate()
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
        process.wait()


def test_data_stats_config_reads_the_runs_data_and_explicit_options_win(runs, tiny_model, tmp_path):
    assert main(["data", "stats", "--config", str(runs["lora"]), "--out", str(tmp_path / "by-config")]) == 0
    assert main(["data", "stats", str(ALPACA_DEMO), "--tokenizer", str(tiny_model), "--max-length", "256",
                 "--out", str(tmp_path / "explicit")]) == 0
    by_config = json.loads((tmp_path / "by-config" / "stats.json").read_text())
    explicit = json.loads((tmp_path / "explicit" / "stats.json").read_text())
    assert by_config.pop("png").startswith(str(tmp_path / "by-config")) and explicit.pop("png")
    assert by_config == explicit and by_config["unit"] == "tokens" and by_config["max_length"] == 256
    # an override wins over the file, an explicit option over both
    assert main(["data", "stats", "data.max_length=64", "--config", str(runs["lora"]),
                 "--out", str(tmp_path / "override")]) == 0
    assert json.loads((tmp_path / "override" / "stats.json").read_text())["max_length"] == 64
    assert main(["data", "stats", "data.max_length=64", "--config", str(runs["lora"]), "--max-length", "32",
                 "--out", str(tmp_path / "wins")]) == 0
    assert json.loads((tmp_path / "wins" / "stats.json").read_text())["max_length"] == 32


@pytest.mark.parametrize("command", [["merge", "--out", "m"], ["export", "--format", "gguf", "--out", "m.gguf"],
                                     ["serve"], ["data", "stats", "--out", "s"], ["data", "convert", "--out", "c.jsonl"],
                                     ["data", "clean", "--out", "c.jsonl"], ["data", "split", "--out", "s"]])
def test_a_bad_config_is_a_clear_error(command, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\nmethod:\n  type: lora\n  rnak: 4\n")
    assert main([*command, "--config", str(bad)]) == 2  # an exception other than TunelabError would propagate
    err = capsys.readouterr().err
    assert f"{bad}:5" in err and "rnak" in err
    assert main([*command, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_a_bad_config_is_a_clear_error_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\nmethod:\n  type: lora\n  rnak: 4\n")
    result = run_cli("merge", "--config", str(bad), "--out", "m", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and f"{bad}:5" in result.stderr
