"""``tunelab data convert|clean|split --config RUN.yaml``: the run's data and reading options, explicit ones win.

(``data stats --config`` is tested with the other ``--config`` commands in test_config_flag.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_config, read_jsonl, write_config
from tunelab.cli import main


def _strip(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "provenance"} for row in rows]


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    """``train.jsonl`` (the run's data: 40 questions, some with long answers) and ``other.jsonl`` (5 more)."""
    def write(name: str, count: int, offset: int) -> Path:
        path = tmp_path / name
        rows = [{"instruction": f"Question {i}: what comes after {i}?",
                 "output": " ".join([f"The number after {i} is {i + 1}."]
                                    + [f"Reason {j}: counting {i}{j} steps{j} further{j}." for j in range(i % 7 * 2)])}
                for i in range(offset, offset + count)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path
    return {"train": write("train.jsonl", 40, 0), "other": write("other.jsonl", 5, 100)}


@pytest.fixture
def run_yaml(tmp_path: Path, tiny_model: Path, data: dict[str, Path]) -> Path:
    config = make_config(tmp_path, tiny_model, data["train"], data={"system_prompt": "Answer briefly.",
                                                                   "max_length": 40})
    return write_config(tmp_path, config)


def _system_prompts(path: Path) -> set[str]:
    return {row["messages"][0]["content"] for row in read_jsonl(path) if row["messages"][0]["role"] == "system"}


def test_convert_config_reads_the_runs_data_with_its_system_prompt_and_explicit_options_win(
        run_yaml: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "convert", "--config", str(run_yaml), "--out", str(tmp_path / "by-config.jsonl")]) == 0
    assert "wrote 40 conversation records" in capsys.readouterr().out
    assert main(["data", "convert", str(data["train"]), "--system", "Answer briefly.",
                 "--out", str(tmp_path / "explicit.jsonl")]) == 0
    by_config = read_jsonl(tmp_path / "by-config.jsonl")
    assert _strip(by_config) == _strip(read_jsonl(tmp_path / "explicit.jsonl"))
    assert len(by_config) == 40 and _system_prompts(tmp_path / "by-config.jsonl") == {"Answer briefly."}
    # an override (before or after the options) wins over the file, an explicit option over both
    assert main(["data", "convert", "data.system_prompt=Be exact.", "--config", str(run_yaml),
                 "--out", str(tmp_path / "override.jsonl")]) == 0
    assert _system_prompts(tmp_path / "override.jsonl") == {"Be exact."}
    assert main(["data", "convert", "--config", str(run_yaml), "--out", str(tmp_path / "late.jsonl"),
                 "data.system_prompt=Late."]) == 0
    assert _system_prompts(tmp_path / "late.jsonl") == {"Late."}
    assert main(["data", "convert", "data.system_prompt=Be exact.", "--config", str(run_yaml), "--system", "Mine.",
                 "--out", str(tmp_path / "wins.jsonl")]) == 0
    assert _system_prompts(tmp_path / "wins.jsonl") == {"Mine."}
    # input files win over data.train
    assert main(["data", "convert", str(data["other"]), "--config", str(run_yaml),
                 "--out", str(tmp_path / "from-other.jsonl")]) == 0
    other = read_jsonl(tmp_path / "from-other.jsonl")
    assert len(other) == 5 and other[0]["messages"][1]["content"].startswith("Question 100")


def test_clean_config_drops_what_is_longer_than_the_runs_max_length_in_its_tokens(
        run_yaml: Path, data: dict[str, Path], tiny_model: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "clean", "--config", str(run_yaml), "--no-dedup", "--out", str(tmp_path / "c.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert main(["data", "clean", str(data["train"]), "--no-dedup", "--length-unit", "tokens", "--tokenizer",
                 str(tiny_model), "--max-length", "40", "--out", str(tmp_path / "explicit.jsonl")]) == 0
    kept = read_jsonl(tmp_path / "c.jsonl")
    assert kept == read_jsonl(tmp_path / "explicit.jsonl")
    assert 0 < len(kept) < 40 and "removed: longer than --max-length 40 tokens" in printed
    assert f"rejected records and why: {tmp_path / 'c.rejects.jsonl'}" in printed
    # an override of data.max_length applies; an explicit --max-length wins; --length-unit words uses no config length
    assert main(["data", "clean", "data.max_length=400", "--config", str(run_yaml), "--no-dedup",
                 "--out", str(tmp_path / "override.jsonl")]) == 0
    assert len(read_jsonl(tmp_path / "override.jsonl")) == 40
    assert main(["data", "clean", "data.max_length=400", "--config", str(run_yaml), "--no-dedup", "--max-length",
                 "40", "--out", str(tmp_path / "wins.jsonl")]) == 0
    assert read_jsonl(tmp_path / "wins.jsonl") == kept
    assert main(["data", "clean", "--config", str(run_yaml), "--no-dedup", "--length-unit", "words",
                 "--out", str(tmp_path / "words.jsonl")]) == 0
    assert len(read_jsonl(tmp_path / "words.jsonl")) == 40


def test_split_config_splits_the_runs_data_and_input_files_win(
        run_yaml: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "split", "--config", str(run_yaml), "--ratios", "0.5,0.5", "--seed", "3",
                 "--out", str(tmp_path / "by-config")]) == 0
    assert "train 20 (50.0%), val 20 (50.0%)" in capsys.readouterr().out
    assert main(["data", "split", str(data["train"]), "--ratios", "0.5,0.5", "--seed", "3",
                 "--out", str(tmp_path / "explicit")]) == 0
    for name in ("train", "val"):
        by_config, explicit = (read_jsonl(tmp_path / run / f"{name}.jsonl") for run in ("by-config", "explicit"))
        assert by_config == explicit and len(by_config) == 20
    assert main(["data", "split", f"data.train={data['other']}", "--config", str(run_yaml), "--ratios", "0.6,0.4",
                 "--out", str(tmp_path / "override")]) == 0
    assert "train 3 (60.0%), val 2 (40.0%)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["convert", "clean", "split"])
def test_without_inputs_or_config_and_overrides_without_config_are_clear_errors(
        command: str, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", command, "--out", str(tmp_path / "o")]) == 2
    assert f"tunelab data {command} needs INPUT files (or --config)" in capsys.readouterr().err
    assert main(["data", command, str(data["train"]), "--out", str(tmp_path / "o"), "data.max_length=64"]) == 2
    assert "data.max_length=64: section.key=value overrides need --config RUN.yaml" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
