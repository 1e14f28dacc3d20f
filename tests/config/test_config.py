"""Config: schema validation, readable errors with file and line, overrides, generated reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from tunelab.config import (
    MOVED_TO_OBJECTIVE_SECTION,
    base_quantization,
    config_errors,
    dump_config,
    load_config,
    method_spec,
    objective_specs,
    rules,
    suggest_key,
)
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


# ---------------------------------------------------------------------------------------------
# The objective's section, the method's section, moved keys, no mutation, the rules


DPO = VALID.replace("train:\n  lr: 1.0e-4\n", "train:\n  objective: dpo\n  lr: 1.0e-4\ndpo:\n  beta: 0.3\n  loss_type: ipo\n")


def test_the_objective_section_is_validated_by_its_settings_class(tmp_path):
    config = load_config(write(tmp_path, DPO))
    assert type(config.objective_settings).__name__ == "DPOSettings"
    assert (config.objective_settings.beta, config.objective_settings.loss_type) == (0.3, "ipo")
    assert config.objective_settings.rpo_alpha == 0.0  # the class's default
    # Defaults live in the settings classes: simpo's beta is 2.0, dpo's 0.1, without a section.
    simpo = load_config(write(tmp_path, VALID), ["train.objective=simpo"])
    assert simpo.objective_settings.beta == 2.0 and simpo.objective_settings.gamma == 0.5
    assert load_config(write(tmp_path, VALID), ["train.objective=dpo"]).objective_settings.beta == 0.1
    path = write(tmp_path, DPO.replace("beta: 0.3", "beta: -1").replace("loss_type: ipo", "loss_type: ipo\n  betta: 2"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).splitlines() == [
        f"{path}:12: 'dpo.beta' = -1: Input should be greater than 0",
        f"{path}:14: unknown key 'dpo.betta'; did you mean 'dpo.beta'?",
    ]
    with pytest.raises(ConfigError, match=r"command line: 'dpo.loss_type' = 'square': Input should be"):
        load_config(write(tmp_path, DPO), ["dpo.loss_type=square"])


def test_a_section_for_another_objective_is_refused(tmp_path):
    path = write(tmp_path, DPO.replace("dpo:", "kto:").replace("  loss_type: ipo\n", ""))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (f"{path}:11: kto: this section holds the settings of objective kto, but "
                                "train.objective is dpo; set train.objective: kto, or move its settings into a "
                                "'dpo:' section")
    with pytest.raises(ConfigError, match=r"command line: grpo: .*train.objective is sft; set train.objective: grpo, "
                                          r"or remove it \(sft has no settings\)"):
        load_config(write(tmp_path, VALID), ["grpo.num_generations=8"])


@pytest.mark.parametrize("key", MOVED_TO_OBJECTIVE_SECTION)
def test_each_old_flat_key_says_where_it_went(tmp_path, key):
    owners = [name for name, spec in objective_specs().items() if key in spec.settings.model_fields]
    objective = owners[-1]
    path = write(tmp_path, VALID.replace("  lr: 1.0e-4", f"  objective: {objective}\n  {key}: 1"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}:10: unknown key 'train.{key}'; did you mean '{objective}.{key}'?" in str(error.value)
    # Computed from the chosen objective: for one without that setting, its owners are named.
    assert suggest_key(f"train.{key}", "sft") == f"{owners[0]}.{key}"
    with pytest.raises(ConfigError, match=rf"did you mean '{owners[0]}.{key}'\? \({key} is a setting of "
                                          rf"{', '.join(owners)}: it applies to train.objective"):
        load_config(write(tmp_path, VALID), [f"train.{key}=1"])


def test_the_method_section_is_validated_by_the_methods_settings_class(tmp_path):
    config = load_config(write(tmp_path, VALID.replace("type: lora", "type: qlora")))
    assert type(config.method).__name__ == "LoRASettings" and config.method.rank == 8
    assert config.method.needs_quantized_base and config.base_quantization == "4bit"
    assert config.model.quantization == "auto"  # resolved where used, not written back
    freeze = load_config(write(tmp_path, VALID.replace("type: lora\n  rank: 8", "type: freeze\n  trainable_layers: '-1:'")))
    assert type(freeze.method).__name__ == "FreezeSettings" and freeze.method.trainable_layers == "-1:"
    assert method_spec("prefix").prompt_learning and method_spec("prompt").prompt_learning
    assert not method_spec("lora").prompt_learning and method_spec("full").trains_base
    path = write(tmp_path, VALID.replace("rank: 8", "rank: 8\n  num_virtual_tokens: 4"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}:6: method.type lora does not use: num_virtual_tokens (prefix, prompt only)"
    with pytest.raises(ConfigError, match=r"'method.trainable_layers' = '1-2': .*not a layer slice"):
        load_config(write(tmp_path, VALID.replace("type: lora", "type: freeze").replace("rank: 8", "trainable_layers: 1-2")))


EXAMPLES = sorted([*REPO.glob("examples/*.yaml"), *REPO.glob("examples/real/*.yaml")])


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.relative_to(REPO / "examples").as_posix())
def test_loading_never_changes_the_config_and_a_dump_loads_back_equal(tmp_path, example):
    first, second = load_config(example), load_config(example)
    assert dump_config(first) == dump_config(second)
    dumped = write(tmp_path, dump_config(first))
    again = load_config(dumped)
    assert again == first and dump_config(again) == dump_config(first)


def test_values_that_depend_on_another_section_are_computed_not_written_back(tmp_path):
    text = VALID.replace("type: lora", "type: qlora").replace("train:\n", "train:\n  objective: pretrain\n")
    config = load_config(write(tmp_path, text))
    assert config.data.train_on == "assistant" and config.data.trained_tokens("text") == "all"
    assert config.data.trained_tokens("conversations") == "assistant"
    assert config.model.quantization == "auto" and base_quantization(config) == "4bit"
    assert load_config(write(tmp_path, dump_config(config))) == config


def test_the_rules_module_reports_every_broken_rule_and_changes_nothing(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert config_errors(config) == []
    broken = config.model_copy(update={
        "train": config.train.model_copy(update={"precision": "fp16", "batch_tokens": 512}),
        "distributed": config.distributed.model_copy(update={"strategy": "fsdp"}),
    })
    before = dump_config(broken)
    errors = config_errors(broken)
    assert [rule.__name__ for rule in rules.RULES if rule(broken)] == ["fp16_not_sharded", "rows_fit_the_token_budget"]
    assert errors[0].startswith("train.precision fp16 with distributed.strategy fsdp: use bf16")
    assert errors[1].startswith("train.batch_tokens (512) must be at least data.max_length (1024)")
    assert dump_config(broken) == before
    with pytest.raises(ConfigError) as error:  # loading reports both, one line each
        load_config(write(tmp_path, VALID), ["train.precision=fp16", "train.batch_tokens=512",
                                             "distributed.strategy=fsdp"])
    assert len(str(error.value).splitlines()) == 2
    assert rules.online_rl_without_grad_accum(load_config(write(tmp_path, VALID), [
        "train.objective=grpo", "grpo.reward_fn=[format]"]).model_copy(
        update={"train": config.train.model_copy(update={"objective": "grpo", "grad_accum": 2})})).startswith(
        "train.grad_accum does not apply to train.objective grpo (online RL)")


def test_the_config_package_imports_nothing_above_it():
    code = ("import sys, tunelab.config; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('tunelab.')}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['config', 'errors', 'noise']", result.stdout
    source = "\n".join(path.read_text() for path in (REPO / "src" / "tunelab" / "config").glob("*.py"))
    for forbidden in ("open(", "read_text", ".exists(", "json.load"):  # the YAML file is read by read_user_text only
        assert forbidden not in source, forbidden
