"""What a new user meets first: offline model paths, the run an example needs, help, quiet imports, QLoRA on a CPU."""

from __future__ import annotations

import argparse
import logging
import shutil
import time

import pytest
import torch

from conftest import ARITHMETIC_TEST, ARITHMETIC_TRAIN, REPO, make_config
from tunelab import hub
from tunelab.cli import build_parser, main
from tunelab.config import ModelConfig
from tunelab.errors import DataError, TunelabError
from tunelab.models.load import load_model, load_tokenizer
from tunelab.models.source import check_start_model


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything probes the Hub."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    import httpx

    monkeypatch.setattr(httpx, "head", refuse)
    hub.hub_unreachable_reason.cache_clear()
    yield
    hub.hub_unreachable_reason.cache_clear()


@pytest.fixture
def dead_hub(monkeypatch):
    """A Hub endpoint that refuses connections at once (nothing listens on port 9)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.hub_unreachable_reason.cache_clear()
    yield
    hub.hub_unreachable_reason.cache_clear()


def test_names_that_look_like_paths_are_never_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub.looks_like_hub_id("HuggingFaceTB/SmolLM2-135M") and hub.looks_like_hub_id("gpt2")
    for path in ("runs/sft-short", "./model", "/models/x", "~/m", "runs/sft-short/final", "a/b/c", "../x"):
        assert not hub.looks_like_hub_id(path), path


def test_a_missing_local_model_path_fails_at_once_without_the_hub(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    started = time.monotonic()
    for loader in (lambda: load_tokenizer("runs/sft-short"), lambda: load_model(ModelConfig(path="runs/sft-short"),
                                                                                 torch.float32, torch.device("cpu"))):
        with pytest.raises(TunelabError, match="model.path runs/sft-short: no such model directory"):
            loader()
    assert time.monotonic() - started < 5


def test_a_hub_id_fails_fast_and_clearly_when_the_hub_is_unreachable(dead_hub):
    started = time.monotonic()
    with pytest.raises(TunelabError) as caught:
        load_tokenizer("some-org/some-model")
    assert time.monotonic() - started < 10  # not a minute of retries
    message = str(caught.value)
    assert "model.path some-org/some-model" in message and "127.0.0.1:9 is unreachable" in message
    assert "not in the local Hugging Face cache" in message


def test_hf_hub_offline_fails_at_once_for_an_uncached_id(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelabError, match="some-org/some-model: .*HF_HUB_OFFLINE is set"):
        load_tokenizer("some-org/some-model")


def test_a_cached_hub_id_switches_to_offline_mode_when_the_hub_is_unreachable(dead_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "cached_on_disk", lambda repo_id, files, repo_type="model": True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.hub_unavailable("some-org/cached", "model.path", ("config.json",)) is None
    assert constants.HF_HUB_OFFLINE is True  # transformers reads the cache without retrying the network


def test_a_hub_dataset_id_fails_fast_when_the_hub_is_unreachable(dead_hub):
    from tunelab.data.files import read_rows

    with pytest.raises(DataError, match="data file some-org/some-data: .*unreachable"):
        list(read_rows("some-org/some-data"))


def test_an_example_that_needs_an_earlier_run_names_the_command(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    for name in ("grpo.yaml", "ppo.yaml", "sft-short.yaml", "quickstart.yaml", "dpo.yaml"):
        shutil.copy(REPO / "examples" / name, tmp_path / "examples" / name)
    expected = {"grpo.yaml": "tunelab train examples/sft-short.yaml", "ppo.yaml": "tunelab train examples/sft-short.yaml",
                "dpo.yaml": "tunelab train examples/quickstart.yaml"}
    for config, command in expected.items():
        from tunelab.config import load_config

        loaded = load_config(f"examples/{config}")
        with pytest.raises(TunelabError, match=f"Run that first: {command}$"):
            check_start_model(loaded.model.path, loaded.model.tiny is not None, f"examples/{config}")
    check_start_model("runs/quickstart/tiny-model", True, "examples/quickstart.yaml")  # builds its own model


def test_train_cli_reports_the_missing_earlier_run_before_loading_anything(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    for name in ("grpo.yaml", "sft-short.yaml"):
        shutil.copy(REPO / "examples" / name, tmp_path / "examples" / name)
    assert main(["train", "examples/grpo.yaml"]) == 2
    assert "Run that first: tunelab train examples/sft-short.yaml" in capsys.readouterr().err


def test_dpo_on_sft_data_says_the_data_does_not_match_the_objective(tmp_path, tiny_model):
    from tunelab.config import TunelabConfig
    from tunelab.train.engine import train

    config = TunelabConfig.model_validate(make_config(tmp_path, tiny_model, ARITHMETIC_TRAIN,
                                                      train={"objective": "dpo"}))
    with pytest.raises(DataError) as caught:
        train(config)
    message = str(caught.value)
    assert "does not match the objective" in message and "sft" in message
    assert "set data.on_error: skip" not in message  # skipping would drop every record


def test_grpo_on_preference_data_says_the_data_does_not_match(tmp_path, tiny_model):
    from tunelab.data.kinds import check_data_kind
    from tunelab.train.objectives.registry import objective_data_kinds

    kinds = objective_data_kinds()  # objective -> data kind, from the objective registry
    pairs = REPO / "examples" / "data" / "arithmetic_prefs_test.jsonl"
    with pytest.raises(DataError, match="preference pairs.*grpo trains on prompts") as caught:
        check_data_kind([str(pairs)], "grpo", kinds)
    readers = str(caught.value).rsplit("objective for this data: ", 1)[1].split(", ")
    assert sorted(readers) == sorted(["reward", "dpo", "simpo", "orpo"])
    check_data_kind([str(ARITHMETIC_TEST)], "grpo", kinds)  # conversations: the answer is the reference
    check_data_kind([str(pairs)], "dpo", kinds)


def test_every_subcommand_has_an_example_and_shows_its_defaults(capsys):
    from tunelab.cli.help import EXAMPLES, leaf_commands

    parser = build_parser()
    commands = leaf_commands(parser)
    assert sorted(set(commands) - set(EXAMPLES)) == [], "add an example to tunelab.cli.help.EXAMPLES"
    for path, sub in commands.items():
        help_text = sub.format_help()
        assert f"example:\n  {EXAMPLES[path]}" in help_text, path
        assert EXAMPLES[path].startswith(f"tunelab {path}"), path
    serve_help = " ".join(commands["serve"].format_help().split())
    assert "--port PORT (default: 8000)" in serve_help
    assert "--max-prompt-tokens MAX_PROMPT_TOKENS (default: 4096)" in serve_help
    eval_help = " ".join(commands["eval"].format_help().split())
    assert "(default: eval.max_new_tokens of --config, else 256)" in eval_help
    assert "--batch-size BATCH_SIZE (default: 16)" in eval_help and "--seed SEED (default: 0)" in eval_help
    assert "(default: False)" not in eval_help and "(default: None)" not in eval_help


def test_example_commands_parse(monkeypatch):
    """Each help example is a valid command line for its parser."""
    import shlex

    from tunelab.cli.help import EXAMPLES

    parser = build_parser()
    for command in EXAMPLES.values():
        args, extra = parser.parse_known_args(shlex.split(command)[1:])
        assert isinstance(args, argparse.Namespace) and all("=" in item for item in extra), command


def test_bitsandbytes_kernel_noise_is_dropped_and_nothing_else(caplog):
    import tunelab  # noqa: F401  (installs the filters)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "untrusted")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_4bit_layers_the_cpu_kernel_cannot_take_still_evaluate(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models.quant import route_unfit_cpu_4bit_layers

    torch.manual_seed(0)  # the quickstart's sizes: a 352-wide MLP
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(tmp_path / "m")
    model = load_model(ModelConfig(path=str(tmp_path / "m"), quantization="4bit", quant_compute_dtype="bfloat16"),
                       torch.float32, torch.device("cpu"))
    routed = route_unfit_cpu_4bit_layers(model)
    assert routed == ["model.layers.0.mlp.down_proj (352 -> 128)"]  # 352 inputs: not a multiple of 64
    with torch.no_grad():  # evaluation: the fused CPU kernel's path (it crashed on down_proj)
        logits = model.eval()(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()


def test_quickstart_config_still_validates_with_sft_short_beside_it():
    from tunelab.config import load_config

    short, full = load_config(REPO / "examples" / "sft-short.yaml"), load_config(REPO / "examples" / "quickstart.yaml")
    assert short.train.max_steps == 200 and short.output_dir == "runs/sft-short"
    differing = {k for k in ("model", "method", "data", "eval") if getattr(short, k) != getattr(full, k)}
    assert differing == set()  # the same run as `quickstart.yaml train.max_steps=200 output_dir=runs/sft-short`
    assert short.train.model_dump(exclude={"max_steps"}) == full.train.model_dump(exclude={"max_steps"})
