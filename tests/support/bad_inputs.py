"""The bad-input table: what a user may type or leave lying around, and what tunelab must answer.

Each :class:`Case` builds its files in a fresh workspace, runs one ``tunelab`` command in-process
(``tunelab.cli.main``; a process costs seconds of imports) and states the exit code and the words
the answer must hold. tests/e2e/test_bad_input.py runs them all and checks, for every case, that no
traceback escaped and that nothing the user had was lost: every file of the workspace is still
there, byte for byte (unless the case names what may change), and a failed command left nothing
behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import resource
import signal
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from conftest import make_config

GOOD_ROWS = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a in range(4) for b in range(4)]


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def messages(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


@dataclass
class Fixtures:
    """Built once per session: models and a finished training run to copy."""

    model: Path  # the tiny Llama (hidden 64)
    other_model: Path  # the same tokenizer, hidden 32: adapters of one do not fit the other
    run: Path  # a LoRA run of the tiny model: checkpoints step-2, step-4 and final/


class Workspace:
    """A case's directory and helpers to fill it."""

    def __init__(self, root: Path, fixtures: Fixtures) -> None:
        self.root = root
        self.fx = fixtures
        self.model = fixtures.model
        self.data = self.write("data.jsonl", jsonl(*GOOD_ROWS))
        self.out = root / "out"
        self.cleanups: list[Callable[[], None]] = []

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def config(self, name: str = "run.yaml", data_file: Path | str | None = None, text: str | None = None,
               **sections: Any) -> str:
        """Write a training config (tiny model, fast settings, output_dir ``out``) and return its path."""
        if text is not None:
            return str(self.write(name, text))
        config = make_config(self.root, self.model, str(data_file or self.data), **sections)
        config["data"]["max_length"] = sections.get("data", {}).get("max_length", 64)
        config["train"] = {"max_steps": 2, "lr": 1e-3, "batch_tokens": 256, "log_every": 1, "seed": 0,
                           "precision": "fp32", **sections.get("train", {})}
        return str(self.write(name, yaml.safe_dump(config)))

    def run_copy(self, name: str = "run") -> Path:
        """A copy of the finished training run (checkpoints step-2, step-4, final/)."""
        target = self.root / name
        shutil.copytree(self.fx.run, target)
        config = yaml.safe_load((target / "config.yaml").read_text())
        config["output_dir"] = str(target)
        (self.root / f"{name}.yaml").write_text(yaml.safe_dump(config))
        return target

    def adapter(self, name: str = "adapter") -> Path:
        """A copy of the run's final LoRA adapter."""
        target = self.root / name
        shutil.copytree(self.fx.run / "final", target)
        return target


@dataclass
class Case:
    """One bad input.

    Attributes:
        argv: the command, given the workspace.
        code: the exit code it must end with.
        says: words the output (stdout + stderr) must hold, formatted with ``w`` (the workspace).
        setup: prepares the workspace before the command (beyond the default files).
        check: more assertions after the command (what was written, what was kept).
        may_change: workspace paths (relative, prefixes) that may change or appear.
        context: a context manager factory wrapping the command (a disk-size limit, another user).
        cpu_only: the answer holds on a machine without a GPU only.
        world_readable: the workspace must be readable by an unprivileged user (permission cases).
    """

    argv: Callable[[Workspace], list[str]]
    code: int
    says: tuple[str, ...] = ()
    setup: Callable[[Workspace], Any] | None = None
    check: Callable[[Workspace, str], None] | None = None
    may_change: tuple[str, ...] = ()
    context: Callable[[Workspace], Any] | None = None
    cpu_only: bool = False
    world_readable: bool = False


CASES: dict[str, Case] = {}


def case(name: str, argv, code: int, *says: str, **options: Any) -> None:
    assert name not in CASES, name
    CASES[name] = Case(argv if callable(argv) else (lambda w, a=argv: a), code, says, **options)


def run_main(argv: list[str]) -> tuple[int | None, str, str | None]:
    """``tunelab ARGV`` in this process: exit code, stdout + stderr, and the traceback if one escaped."""
    from tunelab.cli import main

    captured = io.StringIO()
    trace = None
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the suite exists to catch
            code, trace = None, traceback.format_exc()
    return code, captured.getvalue(), trace


def train(w: Workspace, *extra: str, **config: Any) -> list[str]:
    return ["train", w.config(**config), *extra]


# --- configuration: every mistake found before anything loads -------------------------------------

case("yaml_syntax_error", lambda w: ["train", w.config(text="model:\n  path: x\n train: [\n")], 2,
     "invalid YAML")
case("duplicate_section", lambda w: ["train", w.config(text=(
    f"model:\n  path: {w.model}\ndata:\n  train: {w.data}\ntrain:\n  lr: 0.1\ntrain:\n  max_steps: 2\n"
    f"output_dir: {w.out}\n"))], 2, "run.yaml:7: duplicate key 'train' (first at line 5)")
case("duplicate_nested_key", lambda w: ["train", w.config(text=(
    f"model:\n  path: {w.model}\ndata:\n  train: {w.data}\ntrain:\n  lr: 0.1\n  lr: 0.2\noutput_dir: {w.out}\n"))],
     2, "run.yaml:7: duplicate key 'train.lr' (first at line 6)")
case("unknown_key_did_you_mean", lambda w: train(w, "train.learning_rate=0.1"), 2,
     "unknown key 'train.learning_rate'; did you mean 'train.lr'?")
case("unknown_section", lambda w: train(w, "trainer.lr=0.1"), 2, "unknown key 'trainer'")
case("wrong_type", lambda w: train(w, "train.lr=fast"), 2, "'train.lr' = 'fast'")
case("adam_betas_out_of_range", lambda w: train(w, "train.adam_betas=[1.5,0.9]"), 2,
     "'train.adam_betas'", "each AdamW beta must be in [0, 1)")
case("adam_betas_one_value", lambda w: train(w, "train.adam_betas=[0.9]"), 2, "train.adam_betas")
case("device_cuda_abc", lambda w: train(w, "train.device=cuda:abc"), 2, "'train.device' = 'cuda:abc'",
     "cuda:N")
case("device_gpu", lambda w: train(w, "train.device=gpu"), 2, "'train.device' = 'gpu'")
case("device_no_gpu", lambda w: train(w, "train.device=cuda"), 2, "no CUDA device is available", cpu_only=True)
case("answer_pattern_invalid_regex", lambda w: train(w, "eval.answer_pattern=("), 2,
     "'eval.answer_pattern' = '('", "not a valid regular expression")
case("answer_pattern_without_group", lambda w: train(w, r"eval.answer_pattern=answer\s+.+"), 2,
     "needs a group around the answer")
case("unknown_eval_metric", lambda w: train(w, "eval.metrics=[bleurt]"), 2, "unknown metric(s) ['bleurt']")
case("missing_model_section", lambda w: ["train", w.config(text=f"data:\n  train: {w.data}\noutput_dir: x\n")],
     2, "missing required key 'model'")
case("missing_data_train", lambda w: ["train", w.config(text=f"model:\n  path: {w.model}\noutput_dir: x\n")],
     2, "missing required key 'data'")
case("config_file_missing", lambda w: ["train", str(w.path("nowhere.yaml"))], 2, "config file not found")
case("config_file_is_a_directory", lambda w: ["train", str(w.root)], 2, "config file is a directory")
case("config_not_utf8", lambda w: ["train", str(w.write("run.yaml", b"model:\n  path: caf\xe9\n"))], 2,
     "not UTF-8 text")
case("config_is_a_list", lambda w: ["train", w.config(text="- model\n- data\n")], 2,
     "the config must be a mapping of sections")
case("config_empty", lambda w: ["train", w.config(text="")], 2, "missing required key")
case("override_without_value", lambda w: train(w, "train.lr"), 2, "expected section.key=value")
case("lora_rank_zero", lambda w: train(w, "method.rank=0"), 2, "'method.rank' = 0")
case("max_length_too_small", lambda w: train(w, "data.max_length=4"), 2, "'data.max_length' = 4")
case("batch_tokens_below_max_length", lambda w: train(w, "train.batch_tokens=32"), 2,
     "train.batch_tokens (32) must be at least data.max_length (64)")
case("qlora_without_quantization", lambda w: train(w, "method.type=qlora", "model.quantization=none"), 2,
     "method.type qlora needs a quantized base")
case("freeze_option_with_lora", lambda w: train(w, "method.trainable_modules=[mlp]"), 2,
     "method.type lora does not use: trainable_modules")
case("val_ratio_above_one", lambda w: train(w, "data.val_ratio=1.5"), 2, "'data.val_ratio' = 1.5")
case("negative_max_grad_norm", lambda w: train(w, "train.max_grad_norm=-1"), 2, "max_grad_norm must be positive")
case("grpo_without_reward", lambda w: train(w, "train.objective=grpo"), 2, "needs a reward")
case("fsdp_with_fp16", lambda w: train(w, "distributed.strategy=fsdp", "train.precision=fp16"), 2,
     "train.precision fp16 with distributed.strategy fsdp")
case("zero_epochs", lambda w: train(w, "train.epochs=0", "train.max_steps=null"), 2, "'train.epochs' = 0")
case("fp16_on_cpu", lambda w: train(w, "train.precision=fp16"), 2, "fp16 needs a GPU", cpu_only=True)
case("unknown_command_option", lambda w: ["train", w.config(), "--resme"], 2, "unrecognized arguments: --resme")
case("config_validate_bad_override", lambda w: ["config", "validate", w.config(), "data.packing=maybe"], 2,
     "data.packing")

# --- data: named by file and line; skip counts and says why ---------------------------------------

DATA_FILES = {
    "jsonl_malformed_line": ("bad.jsonl", jsonl(*GOOD_ROWS[:2]) + '{"instruction": "x", "output": oops}\n', 3,
                             "invalid JSON at column 32"),
    "json_array_syntax_error": ("bad.json", '[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c"}\n]\n', 3,
                                "invalid JSON"),
    "alpaca_missing_output": ("alpaca.jsonl", jsonl(GOOD_ROWS[0], {"instruction": "No answer."}), 2,
                              "record has no 'output' field"),
    "empty_file": ("empty.jsonl", "", None, "no records (the file is empty"),
    "only_blank_lines": ("blank.jsonl", "\n  \n\n", None, "no records"),
    "latin1_bytes": ("latin1.jsonl", jsonl(GOOD_ROWS[0]).encode() + '{"instruction": "Café?", "output": "Oui."}\n'
                     .encode("latin-1"), 2, "not UTF-8 text (byte 0xe9"),
    "unknown_sharegpt_speaker": ("speaker.jsonl", jsonl({"conversations": [{"from": "human", "value": "Hi"},
                                                                           {"from": "robot", "value": "Beep"}]}),
                                 1, "unknown speaker 'robot'"),
    "no_assistant_message": ("noassistant.jsonl", jsonl(messages(("system", "Be nice."), ("user", "Hi"))), 1,
                             "this file holds prompts (with an optional reference answer), but train.objective sft"),
    "unsupported_extension": ("data.xml", "<data/>\n", None, "unsupported file type '.xml'"),
    "csv_wrong_field_count": ("rows.csv", "instruction,output\nSay hi.,Hi!\nAdd 2 and 3.,5,extra\n", 3,
                              "3 fields where the header has 2"),
    "corrupt_parquet": ("broken.parquet", "this is not parquet", None, "cannot read Parquet"),
    "gzip_that_is_not_gzip": ("data.jsonl.gz", jsonl(*GOOD_ROWS), None, "not a readable gzip file"),
    "truncated_gzip": ("cut.jsonl.gz", None, None, "not a readable gzip file"),
    "single_json_object": ("one.json", json.dumps(GOOD_ROWS[0], indent=2), 1, "the file is one JSON object"),
    "roles_two_users": ("users.jsonl", jsonl(messages(("user", "Hi"), ("user", "Hello?"), ("assistant", "Hi!"))), 1,
                        "messages 1 and 2 are both user messages"),
    "system_message_last": ("system.jsonl", jsonl(messages(("user", "Hi"), ("assistant", "Hello"),
                                                           ("system", "Be brief."))), 1,
                            "message 3 is a system message; only the first message may be one"),
    "starts_with_assistant": ("first.jsonl", jsonl(messages(("assistant", "Welcome!"), ("user", "Hi"),
                                                            ("assistant", "Hello"))), 1,
                              "message 1 is a assistant message, but the conversation must start with the user"),
    "tool_after_user": ("tool.jsonl", jsonl(messages(("user", "Weather?"), ("tool", "{}"), ("assistant", "Sunny"))), 1,
                        "message 2 is a tool result after a user message"),
    "two_assistants": ("assistants.jsonl", jsonl(messages(("user", "Hi"), ("assistant", "Hello"),
                                                          ("assistant", "Anyone?"))), 1,
                       "messages 2 and 3 are both assistant messages"),
    "content_not_text": ("number.jsonl", jsonl({"messages": [{"role": "user", "content": 42},
                                                             {"role": "assistant", "content": "x"}]}), 1,
                         "'content' must be text, got int"),
    "unknown_role": ("role.jsonl", jsonl({"messages": [{"role": "human", "content": "Hi"},
                                                       {"role": "assistant", "content": "x"}]}), 1,
                     "unknown role 'human'"),
    "empty_messages": ("nomessages.jsonl", jsonl({"messages": []}), 1, "conversation has no messages"),
    "plain_text_for_sft": ("text.txt", "just some text\nmore text\n", 1,
                           "this file holds plain text, but train.objective sft trains on conversations"),
    "record_is_a_list": ("list.jsonl", "[1, 2, 3]\n", 1, "expected an object"),
}


def _write_data(w: Workspace, name: str) -> Path:
    file, content, _, _ = DATA_FILES[name]
    if name == "truncated_gzip":
        import gzip

        content = gzip.compress(jsonl(*GOOD_ROWS).encode())[:-12]
    return w.write(file, content)


for _name, (_file, _content, _line, _message) in DATA_FILES.items():
    def _argv(w: Workspace, name: str = _name) -> list[str]:
        return train(w, data_file=_write_data(w, name))

    _where = f"{{w.root}}/{_file}:{_line}: " if _line is not None else f"{{w.root}}/{_file}: "
    case(f"data_{_name}", _argv, 2, _where + _message)

case("data_directory", lambda w: train(w, data_file=w.root), 2, "is a directory; name the data file(s) inside it")
case("data_missing_file", lambda w: train(w, data_file=w.path("nowhere.jsonl")), 2, "nowhere.jsonl: data file not found")
case("data_skip_counts_role_errors", lambda w: ["data", "preview", w.config(data_file=w.write("mixed.jsonl", jsonl(
    messages(("user", "Hi"), ("assistant", "Hello")), messages(("user", "a"), ("user", "b"), ("assistant", "c")),
    messages(("user", "Hi"), ("assistant", "Yo"), ("system", "late")), *GOOD_ROWS[:0])), data={"on_error": "skip",
                                                                                               "format": "messages"}),
                                                "-n", "1", "--style", "brackets"], 0,
     "1 sequences from 3 records", "1 skipped: messages 1 and 2 are both user messages",
     "(merge the two, or fix the roles) (first at {w.root}/mixed.jsonl:2)",
     "1 skipped: message 3 is a system message; only the first message may be one (first at {w.root}/mixed.jsonl:3)")
case("data_skip_everything_bad", lambda w: train(w, data_file=w.write("allbad.jsonl", jsonl(
    {"instruction": "a"}, {"conversations": []}, {"instruction": "c", "output": ""})), data={"on_error": "skip"}), 2,
     "allbad.jsonl: no usable records", "2 skipped: record has no 'output' field")
case("data_30mb_record_costs_little", lambda w: ["data", "preview", w.config(data_file=w.write("huge.jsonl", jsonl(
    {"instruction": "Write a long text.", "output": "lorem ipsum dolor sit amet " * 1_150_000}, *GOOD_ROWS)),
    data={"max_length": 128}, train={"batch_tokens": 256}), "-n", "1", "--style", "brackets"], 0,
     "17 sequences from 17 records", "1 sequences longer than data.max_length were truncated")

# --- the model directory ---------------------------------------------------------------------------


def _copy_model(w: Workspace, name: str = "model") -> Path:
    target = w.root / name
    shutil.copytree(w.model, target)
    return target


def _truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def _truncated_model(w: Workspace) -> list[str]:
    model = _copy_model(w)
    _truncate(model / "model.safetensors")
    return train(w, f"model.path={model}")


def _pickled_model(w: Workspace) -> list[str]:
    model = _copy_model(w)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return train(w, f"model.path={model}")


def _corrupt_tokenizer(w: Workspace) -> list[str]:
    model = _copy_model(w)
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    return train(w, f"model.path={model}")


case("model_path_missing", lambda w: train(w, f"model.path={w.root}/nomodel"), 2, "no such model directory")
case("model_path_not_a_model", lambda w: train(w, f"model.path={w.root}"), 2, "not a Hugging Face model directory")
case("model_truncated_safetensors", _truncated_model, 2, "model.path {w.root}/model: model.safetensors is truncated")
case("model_pickled_weights_only", _pickled_model, 2, "no safetensors weights found; tunelab never loads pickled")
case("model_corrupt_tokenizer", _corrupt_tokenizer, 2, "cannot load the tokenizer")
case("method_target_module_missing", lambda w: train(w, "method.target_modules=[nonexistent_proj]"), 2,
     "nonexistent_proj")

# --- output_dir: claimed, locked, never replaced silently ------------------------------------------


def _user_files(w: Workspace) -> None:
    w.write("out/notes.txt", "my own notes\n")


case("output_dir_is_a_file", lambda w: train(w, f"output_dir={w.write('taken', 'a file')}"), 2,
     "output_dir {w.root}/taken is a file, not a directory")
case("output_dir_holds_a_run", lambda w: ["train", str(w.root / "run.yaml")], 2,
     "already holds a run (checkpoints, final, metrics.jsonl, run.json, config.yaml); pass --resume",
     setup=lambda w: w.run_copy())
case("config_file_in_output_dir", lambda w: ["train", w.config(name="out/config.yaml")], 2,
     "the run writes its resolved config to output_dir/config.yaml, which would replace this file")
case("overwrite_keeps_users_files", lambda w: ["train", str(w.root / "run.yaml"), "--overwrite"], 0,
     "done: 4 steps", setup=lambda w: (w.run_copy(), w.write("run/notes.txt", "mine\n")),
     may_change=("run/",), check=lambda w, out: _assert_kept(w.root / "run" / "notes.txt", "mine\n"))


def _assert_kept(path: Path, text: str) -> None:
    assert path.read_text() == text, f"{path} changed"


def _hold_lock(w: Workspace) -> None:
    """Another live process holds output_dir's lock (as a real second run would)."""
    lock = w.root / "out" / ".tunelab.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, socket, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': 0, "
        "'command': 'tunelab train first.yaml'}).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    w.cleanups.append(lambda: (holder.stdin.close(), holder.wait(timeout=30)))
    assert holder.stdout.readline().strip() == "locked"


def _stale_lock(w: Workspace, host: str | None = None) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    w.write("out/.tunelab.lock", json.dumps({"pid": int(dead.stdout), "host": host or socket.gethostname(),
                                               "started": 0, "command": "tunelab train old.yaml"}))
    w.dead_pid = int(dead.stdout)  # type: ignore[attr-defined]


case("second_run_is_refused", lambda w: train(w), 2, "is in use by another run: pid", "(tunelab train first.yaml)",
     setup=_hold_lock)
case("second_run_with_overwrite_is_refused", lambda w: train(w, "--overwrite"), 2, "is in use by another run",
     setup=lambda w: (_hold_lock(w), w.write("out/metrics.jsonl", '{"step": 1, "loss": 1.0}\n')))
case("stale_lock_is_taken_over", lambda w: train(w, data_file=_write_data(w, "alpaca_missing_output")), 2,
     "took over the lock of pid", "no longer running", "record has no 'output' field",
     setup=_stale_lock, may_change=("out/.tunelab.lock",))
case("lock_of_another_host", lambda w: train(w), 2, "is locked by pid", "on host build-42",
     "a run on another host cannot be checked from here", setup=lambda w: _stale_lock(w, "build-42"))

# --- resume: the newest checkpoint that verifies ----------------------------------------------------


def _resume(w: Workspace) -> list[str]:
    return ["train", str(w.root / "run.yaml"), "--resume", "train.max_steps=6"]


def _damaged_run(damage: Callable[[Path], None]) -> Callable[[Workspace], None]:
    def setup(w: Workspace) -> None:
        run = w.run_copy()
        shutil.rmtree(run / "final")
        (run / "run.json").unlink()
        damage(run)
    return setup


def _resumed_from(step: int) -> Callable[[Workspace, str], None]:
    def check(w: Workspace, output: str) -> None:
        from tunelab.train.reporting import read_metrics

        assert f"resumed from {w.root}/run/checkpoints/step-{step} (step {step})" in output
        assert (w.root / "run" / "final" / "adapter_model.safetensors").is_file()
        steps = [row["step"] for row in read_metrics(w.root / "run" / "metrics.jsonl") if "loss" in row]
        assert steps == list(range(1, 7)), steps
    return check


case("resume_truncated_newest_adapter", _resume, 0,
     "--resume: skipped step-4: adapter_model.safetensors is", "(truncated or changed); kept it as step-4.corrupt",
     setup=_damaged_run(lambda run: _truncate(run / "checkpoints/step-4/adapter_model.safetensors")),
     check=_resumed_from(2), may_change=("run/",))
case("resume_empty_optimizer", _resume, 0, "--resume: skipped step-4: optimizer.pt is 0 bytes",
     setup=_damaged_run(lambda run: os.truncate(run / "checkpoints/step-4/optimizer.pt", 0)),
     check=_resumed_from(2), may_change=("run/",))
case("resume_half_written_metrics_line", _resume, 0, "dropped line(s) 5: not whole JSON rows",
     setup=_damaged_run(lambda run: (run / "metrics.jsonl").write_text(
         (run / "metrics.jsonl").read_text() + '{"step": 5, "loss": 6.1')),
     check=_resumed_from(4), may_change=("run/",))
case("resume_changed_bytes", _resume, 0, "skipped step-4: rng.pt does not match its SHA-256",
     setup=_damaged_run(lambda run: (run / "checkpoints/step-4/rng.pt").write_bytes(
         bytes(reversed((run / "checkpoints/step-4/rng.pt").read_bytes())))),
     check=_resumed_from(2), may_change=("run/",))
case("resume_with_changed_method", lambda w: _resume(w) + ["method.rank=8"], 2,
     "this checkpoint does not fit the model, method or optimizer of this config",
     setup=_damaged_run(lambda run: None), may_change=("run/",))

# --- merge: never deletes what it reads, safetensors only, adapters that fit -----------------------


def _merge(w: Workspace, *extra: str, adapter: Path | None = None, out: str = "merged") -> list[str]:
    return ["merge", "--adapter", str(adapter or w.adapter()), "--out", str(w.root / out), *extra]


def _pickled_adapter(w: Workspace, payload: bytes | None = None) -> Path:
    adapter = w.adapter()
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(payload or b"\x80\x04K\x01.")
    return adapter


class _Exploit:
    """A pickle that creates a file when loaded: what a malicious adapter_model.bin does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


case("merge_out_is_the_training_run", lambda w: ["merge", "--adapter", str(w.run_copy() / "final"),
                                                  "--out", str(w.root / "run")], 2,
     "--out {w.root}/run: contains the adapter {w.root}/run/final that this command reads")
case("merge_out_is_the_adapter", lambda w: _merge(w, out="adapter"), 2, "is the adapter")
case("merge_out_is_the_base", lambda w: ["merge", "--adapter", str(w.adapter()), "--base", str(_copy_model(w)),
                                          "--out", str(w.root / "model")], 2, "is the base model")
case("merge_out_exists", lambda w: _merge(w, out="mine"), 2, "--out {w.root}/mine already exists",
     "pass --overwrite to replace it", setup=lambda w: w.write("mine/keep.txt", "mine"))
case("merge_overwrite_replaces_out", lambda w: _merge(w, "--overwrite", out="old"), 0, "merged",
     setup=lambda w: w.write("old/stale.txt", "old export"), may_change=("old/",),
     check=lambda w, _: (assert_file(w.root / "old" / "model.safetensors"), assert_gone(w.root / "old/stale.txt")))
case("merge_pickled_adapter", lambda w: _merge(w, adapter=_pickled_adapter(w)), 2,
     "no adapter_model.safetensors (adapter_model.bin is a pickle); tunelab loads safetensors only")
case("merge_malicious_pickle", lambda w: _merge(w, adapter=_pickled_adapter(
    w, pickle.dumps(_Exploit(str(w.root / "pwned"))))), 2, "tunelab loads safetensors only",
     check=lambda w, _: assert_gone(w.root / "pwned"))
case("merge_adapter_of_another_base", lambda w: _merge(w, "--base", str(w.fx.other_model)), 2,
     "the adapter does not fit the base model", "in the adapter but the base needs")
case("merge_not_an_adapter", lambda w: ["merge", "--adapter", str(w.root), "--out", str(w.root / "m")], 2,
     "not a PEFT adapter directory (no adapter_config.json)")
case("merge_adapter_missing", lambda w: ["merge", "--adapter", str(w.root / "gone"), "--out", str(w.root / "m")],
     2, "no such directory")
case("merge_truncated_adapter", lambda w: _merge(w, adapter=_cut_adapter(w)), 2,
     "adapter_model.safetensors is truncated")
case("merge_adapter_config_not_json", lambda w: _merge(w, adapter=_broken_adapter_config(w)), 2,
     "adapter_config.json cannot be read")
case("merge_base_missing", lambda w: _merge(w, "--base", str(w.root / "nobase")), 2, "no such model directory")


def _cut_adapter(w: Workspace) -> Path:
    adapter = w.adapter()
    _truncate(adapter / "adapter_model.safetensors")
    return adapter


def _broken_adapter_config(w: Workspace) -> Path:
    adapter = w.adapter()
    (adapter / "adapter_config.json").write_text("{not json")
    return adapter


def assert_file(path: Path) -> None:
    assert path.is_file(), f"{path} missing"


def assert_gone(path: Path) -> None:
    assert not path.exists(), f"{path} exists"


# --- export ------------------------------------------------------------------------------------------

case("onnx_out_is_the_model", lambda w: ["export", "--format", "onnx", "--model", str(_copy_model(w)),
                                          "--out", str(w.root / "model")], 2, "is the model directory")
case("onnx_out_contains_the_model", lambda w: ["export", "--format", "onnx", "--model", str(_copy_model(w, "a/m")),
                                                "--out", str(w.root / "a")], 2, "contains the model directory")
case("onnx_out_exists", lambda w: ["export", "--format", "onnx", "--model", str(w.model), "--out",
                                    str(w.root / "prod")], 2, "--out {w.root}/prod already exists",
     setup=lambda w: w.write("prod/model.onnx", "the one in production"))
case("gguf_out_exists", lambda w: ["export", "--format", "gguf", "--model", str(w.model), "--out",
                                    str(w.write("model.gguf", "yesterday's export"))], 2,
     "--out {w.root}/model.gguf already exists")
case("gguf_out_is_a_directory", lambda w: ["export", "--format", "gguf", "--model", str(w.model), "--out",
                                            str(w.root)], 2, "is a directory; name the .gguf file")

# --- serve and eval: adapters checked before the server starts --------------------------------------

case("serve_adapter_of_another_base", lambda w: ["serve", "--model", str(w.fx.other_model), "--adapter",
                                                  f"chat={w.adapter()}", "--no-monitor", "--device", "cpu"], 2,
     "--adapter chat={w.root}/adapter: the adapter does not fit the base model")
case("serve_pickled_adapter", lambda w: ["serve", "--model", str(w.model), "--adapter",
                                          f"chat={_pickled_adapter(w)}", "--no-monitor"], 2,
     "tunelab loads safetensors only")
case("serve_adapter_spec", lambda w: ["serve", "--model", str(w.model), "--adapter", "chat", "--no-monitor"], 2,
     "expected NAME=DIR")
case("eval_answer_pattern_invalid", lambda w: ["eval", "--model", str(w.model), "--data", str(w.data), "--out",
                                                str(w.root / "ev"), "--answer-pattern", "("], 2,
     "--answer-pattern '(': not a valid regular expression")
case("eval_out_holds_a_report", lambda w: ["eval", "--model", str(w.model), "--data", str(w.data), "--out",
                                            str(w.root / "ev")], 2, "{w.root}/ev/results.json already exists",
     setup=lambda w: w.write("ev/results.json", "{}"))
case("eval_adapter_of_another_base", lambda w: ["eval", "--model", str(w.fx.other_model), "--adapter",
                                                 str(w.adapter()), "--data", str(w.data), "--out",
                                                 str(w.root / "ev"), "--device", "cpu"], 2,
     "the adapter does not fit the base model")
case("compare_out_holds_eval_results", lambda w: ["compare", "--predictions", str(w.write("ev/predictions.jsonl", "")),
                                                   "--predictions", str(w.write("b.jsonl", "")), "--out",
                                                   str(w.root / "ev")], 2,
     "{w.root}/ev/results.json already exists", setup=lambda w: w.write("ev/results.json", "{}"))

# --- verify, monitor, models tiny: their outputs claimed like every other ----------------------------

RULES = "rules:\n  - name: errors\n    metric: error_rate\n    z: 4\n"  # a valid alert rules file
case("verify_report_exists", lambda w: ["verify", "--model", str(w.model), "--model", f"again=hf:{w.model}",
                                         "--prompts", str(w.write("prompts.txt", "Add 1 and 2.\n")), "--report",
                                         str(w.write("parity.json", "{}"))], 2, "{w.root}/parity.json already exists")
case("export_report_exists_refused_before_exporting",
     lambda w: ["export", "--format", "gguf", "--model", str(w.model), "--out", str(w.root / "m.gguf"), "--prompts",
                str(w.write("prompts.txt", "Add 1 and 2.\n")), "--report", str(w.write("parity.json", "{}"))], 2,
     "{w.root}/parity.json already exists")
case("monitor_report_out_holds_a_report", lambda w: ["monitor", "report", "--db", str(w.root / "store.db"), "--out",
                                                      str(w.root / "mon")], 2,
     "{w.root}/mon/report.html already exists",
     setup=lambda w: w.write("mon/report.html", "my page"))
case("monitor_drift_json_exists", lambda w: ["monitor", "drift", "--db", str(w.root / "store.db"), "--reference",
                                              str(w.data), "--json", str(w.write("drift.json", "[]"))], 2,
     "{w.root}/drift.json already exists")
case("monitor_alerts_json_is_the_rules", lambda w: ["monitor", "alerts", "--db", str(w.root / "store.db"), "--rules",
                                                     str(w.write("rules.yaml", RULES)), "--json",
                                                     str(w.root / "rules.yaml"), "--overwrite"], 2,
     "is also an input of this command")

case("models_tiny_into_a_model_directory", lambda w: ["models", "tiny", str(w.root / "mine"), "--hidden", "32",
                                                      "--heads", "2"], 2, "OUT_DIR {w.root}/mine already exists",
     setup=lambda w: shutil.copytree(w.model, w.root / "mine"))

# --- data tools: outputs claimed, inputs never replaced -----------------------------------------------

case("convert_out_is_the_input", lambda w: ["data", "convert", str(w.data), "--out", str(w.data)], 2,
     "is also an input of this command")
case("convert_out_is_the_input_even_with_overwrite", lambda w: ["data", "convert", str(w.data), "--out", str(w.data),
                                                                 "--overwrite"], 2, "is also an input")
case("convert_out_exists", lambda w: ["data", "convert", str(w.data), "--out", str(w.write("c.jsonl", "mine\n"))], 2,
     "{w.root}/c.jsonl already exists")
case("convert_rejects_file_exists", lambda w: ["data", "convert", str(w.data), "--out", str(w.root / "c.jsonl")], 2,
     "{w.root}/c.rejects.jsonl already exists", setup=lambda w: w.write("c.rejects.jsonl", "keep me\n"))
case("convert_overwrite_replaces", lambda w: ["data", "convert", str(w.data), "--out", str(w.write("c.jsonl", "old\n")),
                                               "--overwrite"], 0, "wrote 16 conversation records",
     may_change=("c.jsonl",))
case("split_out_holds_splits", lambda w: ["data", "split", str(w.data), "--out", str(w.root / "splits")], 2,
     "{w.root}/splits/train.jsonl already exists", setup=lambda w: w.write("splits/train.jsonl", "old\n"))
case("clean_out_exists", lambda w: ["data", "clean", str(w.data), "--out", str(w.write("clean.jsonl", "x\n"))], 2,
     "already exists")
case("split_bad_ratios_named_before_the_existing_output",
     lambda w: ["data", "split", str(w.data), "--out", str(w.root / "splits"), "--ratios", "0.5,0.7", "--overwrite"],
     2, "--ratios '0.5,0.7' add up to 1.2", setup=lambda w: w.write("splits/train.jsonl", "old\n"))
case("clean_bad_option_named_before_the_existing_output",
     lambda w: ["data", "clean", str(w.data), "--out", str(w.write("clean.jsonl", "x\n")), "--near-dup-threshold",
                "2", "--overwrite"], 2, "--near-dup-threshold 2.0: must be in (0, 1]")
case("stats_negative_max_length", lambda w: ["data", "stats", str(w.data), "--out", str(w.root / "st"),
                                              "--max-length", "-3"], 2, "argument --max-length: -3 is below 1")
case("cot_limit_zero", lambda w: ["data", "cot", str(w.data), "--out", str(w.root / "c.jsonl"), "--limit", "0"], 2,
     "argument --limit: 0 is below 1")
case("stats_out_holds_a_report", lambda w: ["data", "stats", str(w.data), "--out", str(w.root / "st")], 2,
     "{w.root}/st/report.md already exists", setup=lambda w: w.write("st/report.md", "my notes"))
case("convert_gzip_that_is_not", lambda w: ["data", "convert", str(w.write("in.jsonl.gz", "plain")), "--out",
                                             str(w.root / "c.jsonl")], 2, "not a readable gzip file")
case("augment_out_is_the_input", lambda w: ["data", "augment", str(w.data), "--out", str(w.data), "--backend",
                                             "openai:http://127.0.0.1:9", "--backend-model", "m"], 2,
     "is also an input")

# --- a full disk and no permission: the path named, what was kept said -------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Make the kernel refuse writes past ``limit`` bytes per file (RLIMIT_FSIZE), as a full disk refuses them.

    Real failed writes at every level (Python, torch's C++ writer, safetensors' Rust), without root or a
    mount. The kernel reports EFBIG instead of ENOSPC; torch and safetensors lose the errno either way.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _disk_full_at_checkpoint(step: int, limit: int):
    """The disk fills up while checkpoint ``step`` is written (the earlier ones fit)."""
    @contextlib.contextmanager
    def context(w: Workspace):
        from tunelab.train import checkpoint

        original = checkpoint.save_checkpoint

        def save(output_dir, at_step, *args, **kwargs):
            with file_size_limit(limit) if at_step >= step else contextlib.nullcontext():
                return original(output_dir, at_step, *args, **kwargs)

        checkpoint.save_checkpoint = save
        try:
            yield
        finally:
            checkpoint.save_checkpoint = original
    return context


def _disk_full_final(limit: int):
    @contextlib.contextmanager
    def context(w: Workspace):
        from tunelab.train import engine

        original = engine.save_final

        def save(*args, **kwargs):
            with file_size_limit(limit):
                return original(*args, **kwargs)

        engine.save_final = save
        try:
            yield
        finally:
            engine.save_final = original
    return context


def _then_resume_succeeds(w: Workspace, _: str) -> None:
    assert not any(p.name.startswith(".tmp-") for p in (w.out / "checkpoints").iterdir())
    code, output, trace = run_main(["train", str(w.root / "run.yaml"), "--resume"])
    assert trace is None and code == 0, output[-2000:]
    assert (w.out / "final" / "model.safetensors").is_file()


case("disk_full_while_checkpointing", lambda w: train(w, train={"max_steps": 4, "save_every": 2},
                                                      method={"type": "full"}), 2,
     "{w.root}/out/checkpoints/step-4: cannot write the checkpoint of step 4: file too large",
     "Kept: {w.root}/out/checkpoints/step-2 is the newest intact checkpoint; free space and run again with --resume",
     context=_disk_full_at_checkpoint(4, 100_000), may_change=("out/",), check=_then_resume_succeeds)
case("disk_full_while_saving_final", lambda w: train(w, method={"type": "full"}), 2,
     "{w.root}/out/final: cannot write the final model", "Kept: checkpoints/step-2 holds the trained weights",
     context=_disk_full_final(100_000), may_change=("out/",), check=_then_resume_succeeds)
case("disk_full_while_converting", lambda w: ["data", "convert", str(w.data), "--out", str(w.root / "c.jsonl")], 2,
     "{w.root}/c.jsonl: cannot write the output file: file too large", "Kept: nothing was written",
     context=lambda w: file_size_limit(100), setup=lambda w: w.write("data.jsonl", jsonl(*GOOD_ROWS * 4)))
case("disk_full_while_merging", lambda w: _merge(w), 2, "{w.root}/merged: cannot write the merged model",
     context=lambda w: file_size_limit(100_000))


@contextlib.contextmanager
def unprivileged(w: Workspace):
    """Run as a user who may not write the read-only paths (root ignores permission bits: drop to nobody)."""
    for path in w.readonly:  # type: ignore[attr-defined]
        path.chmod(0o555)
    w.cleanups.append(lambda: [path.chmod(0o755) for path in w.readonly])  # type: ignore[attr-defined]
    # What the commands import lazily: the Python installation may not be readable by that user.
    import optparse  # noqa: F401 - nltk's, through rouge_score

    import tunelab.datatools.convert  # noqa: F401
    import tunelab.eval.generation_eval  # noqa: F401
    import tunelab.eval.report  # noqa: F401
    import tunelab.eval.suite  # noqa: F401
    import tunelab.train.engine  # noqa: F401
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _readonly_dir(w: Workspace, name: str, writable_root: bool = False) -> Path:
    directory = w.root / name
    directory.mkdir()
    for path in (w.root, *w.root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if writable_root:  # the run's own output_dir can be made there
        w.root.chmod(0o777)
    w.readonly = [directory]  # type: ignore[attr-defined]
    return directory


case("no_permission_for_output", lambda w: ["data", "convert", str(w.data), "--out",
                                            str(_readonly_dir(w, "shared") / "c.jsonl")], 2,
     "{w.root}/shared/c.jsonl: cannot write the output file: permission denied", context=unprivileged,
     world_readable=True)
case("no_permission_for_output_dir", lambda w: ["train", w.config(), f"output_dir={_readonly_dir(w, 'runs')}/x"], 2,
     "{w.root}/runs/x: cannot write the run directory: permission denied", context=unprivileged, world_readable=True)
case("no_permission_for_data_cache", lambda w: train(w, f"model.path={_copy_model(w)}",
                                                     f"data.cache_dir={_readonly_dir(w, 'cache', writable_root=True)}/data"), 2,
     "{w.root}/cache/data: cannot write the tokenized data cache: permission denied",
     "set data.cache_dir to a directory you can write", context=unprivileged, world_readable=True)
case("output_dir_under_a_file", lambda w: train(w, f"output_dir={w.write('notes.txt', 'mine')}/run"), 2,
     "{w.root}/notes.txt/run: cannot write the run directory: a part of the path is a file, not a directory")
case("convert_out_under_a_file", lambda w: ["data", "convert", str(w.data), "--out",
                                             f"{w.write('notes.txt', 'mine')}/c.jsonl"], 2,
     "a part of the path is a file, not a directory")
case("no_permission_for_eval_report", lambda w: ["eval", "--model", str(_copy_model(w)), "--data", str(w.data), "--out",
                                                 f"{_readonly_dir(w, 'reports')}/ev", "--max-samples", "1",
                                                 "--max-new-tokens", "2", "--metrics", "exact_match",
                                                 "--device", "cpu"], 2,
     "{w.root}/reports/ev: cannot write the evaluation report: permission denied", context=unprivileged,
     world_readable=True)
