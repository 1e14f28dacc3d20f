"""Online RL on the engine with 2 CPU processes (gloo): GRPO and PPO with DDP and FSDP2.

Every process samples the step's rollouts (same seed, same weights) and the engine splits each
optimizer step's micro-batches among the processes, so the per-step losses, rewards and gradient
norms must equal those of one process (within 1e-4). One run per objective is also killed with
SIGKILL after step 2 and resumed from its step-1 checkpoint with ``--resume``: the resumed run's
metrics are the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ARITHMETIC_TRAIN, REPO, make_config, run_cli, write_config
from training_runs import final_weights, metric_rows
from tunelab.config import config_from_dict
from tunelab.train.checkpoint import list_checkpoints

STEPS = 3


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_after_step(config_path: Path, step: int) -> str:
    """Start a 2-process run and SIGKILL torchrun and its workers once it reports ``step``; return its output."""
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config_path), "--nproc", "2"],
                               stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, cwd=REPO)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith(f"step {step}:"):
                break
    finally:
        workers = descendants(process.pid)
        for pid in [*workers, process.pid]:  # like a lost node: nothing gets to clean up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=60)
        deadline = time.monotonic() + 60  # the workers are not our children: wait until the kernel ends them
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
    output = "".join(seen)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{output[-3000:]}"
    return output
VOWEL_REWARD = '''
def vowels(prompts, completions, references):
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]
'''
OBJECTIVES = {
    # GRPO: 4 prompts x 4 answers, 2 minibatches of 8 rows in micro-batches of 4 (2 per process)
    "grpo": ({"type": "lora", "rank": 4}, {"num_generations": 4, "minibatches": 2}),
    # PPO with a value head: 2 epochs x 2 minibatches of 4 rows in micro-batches of 2
    "ppo": ({"type": "full"}, {"num_generations": 2, "update_epochs": 2, "minibatches": 2, "kl_target": 0.5,
                               "generation_batch_size": 2}),
}


def rl_config(folder: Path, model: Path, reward: Path, objective: str, **distributed) -> dict:
    method, extra = OBJECTIVES[objective]
    train = {"objective": objective, "max_steps": STEPS, "save_every": 1, "keep_checkpoints": 3, "lr": 5e-3,
             "schedule": "constant", "warmup_ratio": 0.0, "log_every": 1, "eval_at_start": True}
    own = {"reward_fn": [f"{reward}:vowels"], "prompts_per_step": 4, "max_new_tokens": 6, "kl_coef": 0.05,
           "generation_batch_size": 4, **extra}
    return make_config(folder, model, ARITHMETIC_TRAIN, method=method, train=train, **{objective: own},
                       data={"max_length": 96, "val_ratio": 0.02, "max_samples": 200}, eval={"generate_samples": 4},
                       **({"distributed": distributed} if distributed else {}))


@pytest.fixture(scope="module")
def reward(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward") / "vowel_reward.py"
    path.write_text(VOWEL_REWARD)
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model, reward):
    """GRPO and PPO in this process, the reference numbers."""
    from tunelab.train.engine import train

    runs = {}
    for objective in OBJECTIVES:
        folder = tmp_path_factory.mktemp(f"single-{objective}")
        runs[objective] = train(config_from_dict(rl_config(folder, tiny_model, reward, objective))).output_dir
    return runs


def assert_same_run(expected: Path, got: Path) -> None:
    for key in ("loss", "reward", "grad_norm", "entropy", "eval_reward"):
        want, have = metric_rows(expected, key), metric_rows(got, key)
        assert want and [s for s, _ in have] == [s for s, _ in want], key
        assert [v for _, v in have] == pytest.approx([v for _, v in want], abs=1e-4), key


@pytest.mark.parametrize(("objective", "strategy"), [
    ("grpo", "ddp"), ("ppo", "fsdp"),  # killed and resumed too; between them both objectives and strategies
    pytest.param("grpo", "fsdp", marks=pytest.mark.slow), pytest.param("ppo", "ddp", marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, tiny_model, reward, one_process, objective, strategy):
    config_path = write_config(tmp_path, rl_config(tmp_path, tiny_model, reward, objective, strategy=strategy))
    out = tmp_path / "out"
    if (objective, strategy) in {("grpo", "ddp"), ("ppo", "fsdp")}:  # killed and resumed as well
        printed = kill_after_step(config_path, 2)
        assert printed.count("step 1:") == 1, "only rank 0 reports"
        saved = [step for step, _ in list_checkpoints(out)]
        assert saved in ([1], [1, 2]), saved  # killed as step 2 was reported: its checkpoint may be written
        if saved == [1, 2]:
            (out / "checkpoints" / "step-2").rename(out / "checkpoints" / ".gone")  # resume from step 1
        state = json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())
        assert (state["strategy"], state["world_size"]) == (strategy, 2) and "kl_controller" in state
        finished = run_cli("train", str(config_path), "--resume", "--nproc", "2")
        assert "resumed from" in finished.stderr and "(step 1)" in finished.stderr, finished.stderr[-4000:]
    else:
        finished = run_cli("train", str(config_path), "--nproc", "2")
    assert finished.returncode == 0, finished.stderr[-5000:]
    assert_same_run(one_process[objective], out)
    assert [s for s, _ in metric_rows(out, "loss")] == list(range(1, STEPS + 1))
    expected, weights = final_weights(one_process[objective]), final_weights(out)
    assert weights.keys() == expected.keys() and weights
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-4, rtol=0, msg=name)
    if objective == "ppo":
        from safetensors.torch import load_file

        head, want = (load_file(run / "final" / "value_head.safetensors") for run in (out, one_process["ppo"]))
        torch.testing.assert_close(head["linear.weight"], want["linear.weight"], atol=1e-4, rtol=0)
