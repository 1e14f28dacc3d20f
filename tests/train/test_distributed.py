"""Training with 2 processes on CPU (gloo): DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Each strategy is started with ``tunelab train --nproc 2`` (torchrun), killed with SIGKILL after
step 3, and resumed from its step-2 checkpoint. Its per-step losses must equal those of one process
with the same global batch (4 micro-batches per step: 2 per process × 2 processes), and its final
weights, gathered from the shards, must equal the single-process run's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_runs import final_weights, metric_rows

from conftest import ALPACA_DEMO, REPO, make_config, run_cli, write_config
from tunelab.config import config_from_dict
from tunelab.errors import ConfigError
from tunelab.train.checkpoint import list_checkpoints
from tunelab.train.parallel import deepspeed_config, window_share
from tunelab.train.parallel.launch import LaunchError, check_launch

STEPS, KILL_AFTER = 4, 3


def settings(method: dict, grad_accum: int, **distributed) -> dict:
    return dict(
        method=method,
        data={"val_ratio": 0.05, "max_samples": 120},
        train={"max_steps": STEPS, "save_every": 2, "batch_tokens": 512, "lr": 2e-3, "grad_accum": grad_accum,
               "precision": "fp32"},
        **({"distributed": distributed} if distributed else {}),
    )


LORA = {"type": "lora", "rank": 4}
FULL = {"type": "full"}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_model):
    """One process with 4 micro-batches per step, for LoRA and a full fine-tune."""
    from tunelab.train.engine import train

    runs = {}
    for name, method in (("lora", LORA), ("full", FULL)):
        folder = tmp_path_factory.mktemp(f"single-{name}")
        runs[name] = train(config_from_dict(make_config(folder, tiny_model, ALPACA_DEMO, **settings(method, 4)))).output_dir
    return runs


def kill_after_step(config_path, step: int) -> str:
    """Start a 2-process run, SIGKILL all its processes once it reports ``step``; return what it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(config_path), "--nproc", "2"],
        stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
    )
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith(f"step {step}:"):
                os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers, like a lost node
                break
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    output = "".join(seen)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{output[-3000:]}"
    return output


STRATEGIES = [
    pytest.param("ddp", {"strategy": "ddp"}, "lora", id="ddp-lora"),
    pytest.param("fsdp", {"strategy": "fsdp"}, "full", id="fsdp-full"),
    pytest.param("deepspeed", {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}, "lora", id="zero2-lora"),
    pytest.param("deepspeed", {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, "full", id="zero3-full"),
]


def resume_with_one_process(config: dict, output_dir, strategy: str, monkeypatch) -> None:
    """Resume ``output_dir``'s step-2 checkpoint in this process, alone, with the same global batch."""
    from tunelab.train.engine import train

    shutil.copytree(output_dir, config["output_dir"])
    shutil.rmtree(Path(config["output_dir"]) / "final")
    shutil.rmtree(Path(config["output_dir"]) / "checkpoints" / "step-4")
    config = copy.deepcopy(config)
    config["train"]["grad_accum"] = 4
    if strategy == "ddp":  # a DDP checkpoint is an ordinary one: plain single-process training resumes it
        config["distributed"] = {"strategy": "none"}
    else:  # FSDP: a process group of one; torch.distributed.checkpoint reshards 2 -> 1
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        for name, value in {**TORCHRUN_ENV, "WORLD_SIZE": "1", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
    train(config_from_dict(config), resume=True)


@pytest.mark.parametrize(("engine", "distributed", "method"), STRATEGIES)
def test_two_processes_match_one_and_resume_after_kill(tmp_path, tiny_model, single_process, engine, distributed,
                                                       method, monkeypatch):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="pip install --no-build-isolation 'tunelab[deepspeed]'")
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO,
                         **settings(LORA if method == "lora" else FULL, 2, **distributed))
    config_path = write_config(tmp_path, config)
    out = tmp_path / "out"

    printed = kill_after_step(config_path, KILL_AFTER)
    assert printed.count("step 1:") == 1, "only rank 0 reports"
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert not (out / "final").exists()
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert (state["strategy"], state["world_size"], state["micro"]) == (distributed["strategy"], 2, 8)

    resumed = run_cli("train", str(config_path), "--resume", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from" in resumed.stderr and "(step 2)" in resumed.stderr
    assert resumed.stdout.count("done:") == 1

    reference = single_process[method]
    for key in ("loss", "grad_norm", "eval_loss"):
        expected, got = metric_rows(reference, key), metric_rows(out, key)
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-4), key
    assert [s for s, _ in metric_rows(out, "loss")] == list(range(1, STEPS + 1))

    # final/ is an ordinary HF (full) or PEFT (LoRA) directory gathered from the shards.
    expected_weights, weights = final_weights(reference), final_weights(out)
    assert weights.keys() == expected_weights.keys() and weights
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected_weights[name], atol=1e-5, rtol=0, msg=name)

    if engine in ("ddp", "fsdp"):  # their checkpoints also resume with another number of processes
        alone = {**config, "output_dir": str(tmp_path / "alone")}
        resume_with_one_process(alone, out, engine, monkeypatch)
        expected, got = metric_rows(reference, "loss"), metric_rows(tmp_path / "alone", "loss")
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The plan of a step and the launch checks (no processes needed)


def test_each_process_takes_every_wth_micro_batch_and_pads_a_short_window():
    assert [window_share(4, rank, 2) for rank in (0, 1)] == [[0, 2], [1, 3]]
    assert [window_share(5, rank, 2) for rank in (0, 1)] == [[0, 2, 4], [1, 3, None]]
    assert [window_share(1, rank, 3) for rank in (0, 1, 2)] == [[0], [None], [None]]
    covered = sorted(i for rank in range(3) for i in window_share(7, rank, 3) if i is not None)
    assert covered == list(range(7))


def distributed_config(**values):
    return config_from_dict({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o",
                             "distributed": values}).distributed


TORCHRUN_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(("strategy", "env", "message"), [
    ("fsdp", {**TORCHRUN_ENV, "ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "no"}, "accelerate launch"),
    ("none", {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1"}, "accelerate launch"),
    ("deepspeed", {**TORCHRUN_ENV, "ACCELERATE_USE_DEEPSPEED": "true"}, "accelerate launch"),
    ("fsdp", {}, "WORLD_SIZE is not set"),
    ("none", TORCHRUN_ENV, "each would train its own copy"),
    ("fsdp", {**TORCHRUN_ENV, "WORLD_SIZE": "1", "TUNELAB_NPROC": "2"}, "--nproc 2 was asked for"),
    ("ddp", {"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
])
def test_a_launch_that_would_not_train_as_configured_is_refused(strategy, env, message):
    with pytest.raises(LaunchError, match=message):
        check_launch(distributed_config(strategy=strategy), env)


def test_a_proper_launch_passes_the_checks():
    assert check_launch(distributed_config(strategy="fsdp"), {**TORCHRUN_ENV, "TUNELAB_NPROC": "2"}) == 2
    assert check_launch(distributed_config(), {}) == 1


def test_a_process_group_of_another_size_than_the_launch_is_refused(tmp_path, monkeypatch):
    import torch.distributed as dist

    from tunelab.train.parallel import start_processes

    config = config_from_dict({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": str(tmp_path),
                               "distributed": {"strategy": "ddp"}, "train": {"device": "cpu"}})
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    # A process group someone else created with one process, while the launcher said two.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(LaunchError, match="the process group has 1 processes .* WORLD_SIZE=2"):
            start_processes(config)
    finally:
        dist.destroy_process_group()


def test_the_cli_refuses_accelerate_launch_before_loading_anything(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, ALPACA_DEMO, distributed={"strategy": "fsdp"})
    path = write_config(tmp_path, config)
    env = {**os.environ, **TORCHRUN_ENV, "ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=120, check=False)
    assert result.returncode == 2
    assert "accelerate launch" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_nproc_needs_a_strategy(tmp_path, tiny_model):
    path = write_config(tmp_path, make_config(tmp_path, tiny_model, ALPACA_DEMO))
    result = run_cli("train", str(path), "--nproc", "2")
    assert result.returncode == 2
    assert "distributed.strategy none" in result.stderr and "distributed.strategy=ddp" in result.stderr


@pytest.mark.parametrize(("section", "message"), [
    ({"strategy": "ddp", "fsdp": {"cpu_offload": True}}, "fsdp options apply to strategy fsdp only"),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_params": True}}, "needs zero_stage 3"),
])
def test_options_of_another_strategy_are_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        distributed_config(**section)


def test_combinations_the_engines_cannot_run_are_errors():
    base = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="cannot be sharded"):
        config_from_dict({**base, "method": {"type": "qlora"}, "distributed": {"strategy": "fsdp"}})
    with pytest.raises(ConfigError, match="use bf16"):
        config_from_dict({**base, "train": {"precision": "fp16"}, "distributed": {"strategy": "deepspeed"}})
    with pytest.raises(ConfigError, match="pissa"):
        config_from_dict({**base, "method": {"type": "lora", "init": "pissa"}, "distributed": {"strategy": "fsdp"}})
    with pytest.raises(ConfigError, match="prompt with DeepSpeed ZeRO-3"):
        config_from_dict({**base, "method": {"type": "prompt"},
                          "distributed": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}})
    with pytest.raises(ConfigError, match=r"\(online RL\) runs with distributed.strategy none, ddp or fsdp"):
        config_from_dict({**base, "train": {"objective": "grpo"}, "grpo": {"reward_fn": ["format"]},
                          "distributed": {"strategy": "deepspeed"}})


def test_deepspeed_config_is_built_from_train_and_merged_with_the_users_file(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "overlap_comm": True},
                                "communication_data_type": "fp32"}))
    config = config_from_dict({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o",
                               "train": {"grad_accum": 3, "max_grad_norm": 0.5},
                               "distributed": {"strategy": "deepspeed", "deepspeed": {
                                   "zero_stage": 3, "offload_optimizer": True, "config_file": str(user)}}})
    built = deepspeed_config(config.distributed, config.train, 4, torch.device("cpu"))
    assert built["train_batch_size"] == 12 and built["gradient_accumulation_steps"] == 3
    assert built["gradient_clipping"] == 0.5
    assert built["zero_optimization"] == {"stage": 3, "overlap_comm": True,
                                          "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert built["communication_data_type"] == "fp32"

    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 8 but tunelab runs 3"):
        deepspeed_config(config.distributed, config.train, 4, torch.device("cpu"))
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    # The file is read once, where DeepSpeed is set up (the config holds only its path).
    with pytest.raises(ConfigError, match="remove optimizer"):
        deepspeed_config(config.distributed, config.train, 4, torch.device("cpu"))
    user.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json: not valid JSON"):
        deepspeed_config(config.distributed, config.train, 4, torch.device("cpu"))
