"""SIGTERM/SIGINT during training: a checkpoint of the current step, then a clean stop; --resume continues it
with the same per-step losses as an uninterrupted run (what tunelab ui's stop and resume buttons rely on)."""

from __future__ import annotations

import signal

import pytest

from conftest import ARITHMETIC_TRAIN, make_config
from tunelab.config import config_from_dict
from tunelab.train.checkpoint import list_checkpoints
from tunelab.train.engine import train
from tunelab.train.reporting import read_metrics
from tunelab.train.stop import StopOnSignal, TrainingStopped


def _losses(out) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(out / "metrics.jsonl") if "loss" in row]


def test_sigterm_checkpoints_the_current_step_and_resume_matches_the_uninterrupted_run(tmp_path, tiny_model):
    sig = signal.SIGTERM  # SIGINT goes through the same handler (next test)
    settings = dict(data={"max_samples": 48, "val_ratio": 0.1},
                    train={"max_steps": 6, "eval_every": 2, "save_every": 0, "lr": 2e-3})
    whole = config_from_dict(make_config(tmp_path / "whole", tiny_model, ARITHMETIC_TRAIN, **settings))
    train(whole)

    def signal_at_step_2(model, tokenizer, template, records):  # an evaluator runs inside the loop, at step 2, 4
        if not sent:
            sent.append(True)
            signal.raise_signal(sig)  # the handler only sets a flag: the step finishes
        return {}

    sent: list[bool] = []
    stopped = config_from_dict(make_config(tmp_path / "stopped", tiny_model, ARITHMETIC_TRAIN, **settings))
    before = signal.getsignal(sig)
    with pytest.raises(TrainingStopped, match=f"stopped by {sig.name} after step 2 of 6") as info:
        train(stopped, evaluators=[signal_at_step_2])
    assert info.value.exit_code == 130
    assert signal.getsignal(sig) == before  # the run's handlers are gone
    out = tmp_path / "stopped" / "out"
    assert [step for step, _ in list_checkpoints(out)] == [2]  # save_every 0: the checkpoint is the stop's
    assert not (out / "final").exists()

    train(stopped, resume=True)
    assert _losses(out) == _losses(tmp_path / "whole" / "out")


def test_sigint_asks_to_stop_and_a_second_one_stops_at_once():
    # A shell starts background jobs with SIGINT ignored; the test needs Python's own handler, as in a terminal.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopOnSignal()
        try:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
