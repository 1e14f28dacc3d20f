"""Config: schema validation, readable errors with file and line, overrides, generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run_cli
from tunelab.config import load_config, suggest_key
from tunelab.docs import config_reference
from tunelab.errors import ConfigError

VALID = """\
model:
  path: some/model
method:
  type: lora
  rank: 8
data:
  train: data.jsonl
train:
  lr: 1.0e-4
output_dir: out
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_config_and_defaults(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert config.method.rank == 8 and config.train.lr == 1e-4
    assert config.data.train == ["data.jsonl"]  # one file or a list
    assert config.model.trust_remote_code is False
    assert config.data.packing is True and config.data.train_on == "assistant"


def test_overrides_win_and_are_typed(tmp_path):
    config = load_config(write(tmp_path, VALID), ["train.lr=3e-4", "data.packing=false", "method.target_modules=[q_proj,v_proj]"])
    assert config.train.lr == 3e-4 and config.data.packing is False
    assert config.method.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, VALID.replace("  lr: 1.0e-4", "  lr: 1.0e-4\n  lerning_rate: 3"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}:10: unknown key 'train.lerning_rate'; did you mean 'train.lr'?"


@pytest.mark.parametrize(
    ("wrong", "right"),
    [("train.bach_size", "train.batch_size"), ("method.lora_rank", "method.rank"), ("data.pack", "data.packing"),
     ("lr", "train.lr"), ("model.trust_remote", "model.trust_remote_code"), ("train.gradient_accumulation", "train.grad_accum"),
     ("train.learning_rate", "train.lr"), ("gradient_accumulation_steps", "train.grad_accum"), ("method.lora_alpha", "method.alpha")],
)
def test_suggestions(wrong, right):
    assert suggest_key(wrong) == right


def test_misspelt_override_is_reported_as_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train.epoch'; did you mean 'train.epochs'\?"):
        load_config(write(tmp_path, VALID), ["train.epoch=2"])


def test_wrong_types_and_values_give_one_line_each(tmp_path):
    text = VALID.replace("rank: 8", "rank: eight").replace("type: lora", "type: lorra")
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    lines = str(error.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{tmp_path / 'run.yaml'}:4: 'method.type' = 'lorra': Input should be 'full', 'freeze', 'lora', 'qlora', 'prefix' or 'prompt'")
    assert lines[1].startswith(f"{tmp_path / 'run.yaml'}:5: 'method.rank' = 'eight'")


def test_missing_keys_and_bad_combinations(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        load_config(write(tmp_path, VALID.replace("output_dir: out\n", "")))
    with pytest.raises(ConfigError, match=r"train.batch_tokens \(512\) must be at least data.max_length \(1024\)"):
        load_config(write(tmp_path, VALID), ["train.batch_tokens=512"])


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml:4: invalid YAML: .*started at line 3"):
        load_config(write(tmp_path, "model:\n  path: x\n  bad: [unclosed\n"))


def test_cli_validate_and_errors_without_traceback(tmp_path):
    ok = run_cli("config", "validate", str(write(tmp_path, VALID)), "train.epochs=2", "--show")
    assert ok.returncode == 0 and "valid" in ok.stdout and "epochs: 2.0" in ok.stdout
    bad = run_cli("config", "validate", str(write(tmp_path, VALID.replace("method:", "methd:"))))
    assert bad.returncode == 2
    assert "unknown key 'methd'; did you mean 'method'?" in bad.stderr
    assert "Traceback" not in bad.stderr
    train = run_cli("train", str(tmp_path / "run.yaml"), "train.lr=abc")
    assert train.returncode == 2 and "'train.lr' = 'abc'" in train.stderr and "Traceback" not in train.stderr


def test_docs_config_reference_is_up_to_date():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == config_reference(), "run: tunelab config reference --out docs/config.md"
    for key in ("model.path", "method.lora_plus_ratio", "data.on_error", "train.batch_tokens", "output_dir"):
        assert f"`{key}`" in committed
