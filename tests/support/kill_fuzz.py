"""The kill -9 fuzz worker: imports tunelab once, then forks a child for every run it interrupts.

Run by tests/e2e/test_kill_fuzz.py as ``python tests/support/kill_fuzz.py PLAN.json RESULT.json``. The plan
names the tiny model, the data, the settings to train with and a seed. For every setting the
worker first runs the training uninterrupted (counting the crash points it passes, see
:mod:`tunelab.faults`), then, per trial, interrupts a run with SIGKILL one to three times in a row
-- at a seeded crash point (between or inside the writes of checkpoints, metrics, final/), or
after a seeded random delay -- resuming each time with ``--resume``, and finally lets a resumed
run finish. The final weights must equal the uninterrupted run's bit for bit and the metrics must
read the same (every logged value, no duplicated evaluation row).

Forking from a process that has imported torch but never run an operation gives each run a
fresh start without paying the import time again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _child(argv: list[str], log: Path, env: dict[str, str]) -> None:
    """In the forked child: run ``tunelab ARGV`` with ``env`` set, output to ``log``; never returns."""
    code = 70
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(env)
        from tunelab import faults
        from tunelab.cli import main

        faults.reset()
        code = main(argv)
    except BaseException:  # noqa: BLE001 - reported through the exit code and the log
        import traceback

        traceback.print_exc()
        code = 71
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 72)


def run(argv: list[str], log: Path, env: dict[str, str], kill_after: float | None = None) -> int:
    """Fork a child running ``tunelab ARGV``; return its exit code, or -9 when it died of SIGKILL.

    ``kill_after``: send the child SIGKILL after this many seconds (if it is still running).
    """
    pid = os.fork()
    if pid == 0:
        _child(argv, log, env)
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = None
        time.sleep(0.005)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def outcome(out: Path) -> dict[str, Any]:
    """What must not depend on interruptions: final weights and every logged metric but timings."""
    from safetensors.torch import load_file

    from tunelab.train.reporting import read_metrics

    timings = {"tokens_per_s", "elapsed_s", "step_s"}
    rows = [{k: v for k, v in row.items() if k not in timings} for row in read_metrics(out / "metrics.jsonl")]
    weights = {}
    for file in sorted((out / "final").glob("*.safetensors")):
        weights.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    # Every file and directory name: no temporary left behind, no checkpoint more or less.
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    return {"rows": rows, "weights": weights, "files": files}


def same(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """None when two outcomes are identical (weights bit for bit), else what differs."""
    if a["rows"] != b["rows"]:
        diff = next((i for i, (x, y) in enumerate(zip(a["rows"], b["rows"])) if x != y), min(len(a["rows"]),
                                                                                         len(b["rows"])))
        return f"metrics differ from row {diff + 1}: {a['rows'][diff:diff + 1]} vs {b['rows'][diff:diff + 1]}"
    if a["files"] != b["files"]:
        return f"other files: {sorted(set(a['files']) ^ set(b['files']))}"
    if a["weights"].keys() != b["weights"].keys():
        return "final/ holds other tensors"
    import torch

    for name, tensor in a["weights"].items():
        other = b["weights"][name]
        if tensor.dtype != other.dtype or tensor.shape != other.shape or not torch.equal(
                tensor.flatten().view(torch.uint8), other.flatten().view(torch.uint8)):
            return f"final weight {name} differs"
    return None


def warm_imports() -> None:
    """Import what a training run imports lazily (nltk, sklearn, peft, the Llama code: seconds per child otherwise)."""
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import tunelab.eval.generation_eval  # noqa: F401
    import tunelab.train.engine  # noqa: F401
    from tunelab.cli import build_parser

    build_parser()


class Fuzz:
    """Runs the trials of one plan and collects what happened."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.work = Path(plan["work"])
        self.rng = random.Random(plan["seed"])
        self.results: dict[str, Any] = {"kills": [], "random_kills": 0, "trials": [], "failures": [], "points": []}

    def reference(self, index: int, base: dict[str, Any]) -> tuple[list[str], float, dict[str, Any]] | None:
        """Run a setting uninterrupted: its crash points, its duration and its outcome."""
        import yaml

        directory = self.work / f"s{index}-reference"
        directory.mkdir(parents=True)
        (directory / "run.yaml").write_text(yaml.safe_dump({**base, "output_dir": str(directory / "out")}))
        points_log = directory / "points.log"
        started = time.monotonic()
        code = run(["train", str(directory / "run.yaml")], directory / "log.txt",
                   {"TUNELAB_CRASH_AT": "count", "TUNELAB_CRASH_LOG": str(points_log)})
        seconds = time.monotonic() - started
        if code != 0:
            self.results["failures"].append(f"setting {index}: the uninterrupted run exited {code}")
            return None
        points = [line.split(" ", 1)[1] for line in points_log.read_text().splitlines()]
        self.results["points"].append(len(points))
        return points, seconds, outcome(directory / "out")

    def trial(self, name: str, base: dict[str, Any], points: list[str], seconds: float, expected: dict[str, Any],
              chosen: tuple[str, str] | None = None) -> None:
        """Interrupt a run (once at ``chosen``, else up to kills_per_trial times at random), then finish it."""
        import yaml

        directory = self.work / name
        directory.mkdir()
        (directory / "run.yaml").write_text(yaml.safe_dump({**base, "output_dir": str(directory / "out")}))
        argv = ["train", str(directory / "run.yaml")]
        kills: list[str] = []
        code = -9
        for attempt in range(1 if chosen else self.plan["kills_per_trial"]):
            log, points_log = directory / f"log{attempt}.txt", directory / f"points{attempt}.log"
            env = {"TUNELAB_CRASH_LOG": str(points_log)}
            if chosen:  # a chosen moment, by the crash point's name
                point, fraction = chosen
                target = points.index(point) + 1
                env["TUNELAB_CRASH_AT"] = f"{target}:{fraction}" if fraction else str(target)
                code = run(argv, log, env)
            elif self.rng.random() < self.plan["timed_share"]:  # anywhere at all: a seeded random moment
                delay = self.rng.uniform(0.05, seconds)
                env["TUNELAB_CRASH_AT"] = "count"
                code = run(argv, log, env, kill_after=delay)
            else:  # a crash point, maybe inside a write (the file cut at a random fraction)
                # A resumed run passes fewer points than a whole one: aim at its first half.
                target = self.rng.randint(1, len(points) if attempt == 0 else max(1, len(points) // 2))
                fraction = self.rng.choice(["", "0", f"{self.rng.random():.3f}"])
                env["TUNELAB_CRASH_AT"] = f"{target}:{fraction}" if fraction else str(target)
                code = run(argv, log, env)
            if code != -9:
                break  # it finished before the kill came (or failed)
            passed = points_log.read_text().splitlines() if points_log.is_file() else []
            last = passed[-1].split(" ", 1)[1] if passed else "start-up"
            if env["TUNELAB_CRASH_AT"] == "count":
                where = f"after {last!r} (killed from outside at a random moment)"
            elif last.startswith("cut at "):
                fraction, _, point = last.removeprefix("cut at ").partition(": ")
                where = f"inside {point!r}, the write cut at {fraction}"
            else:
                where = f"at {last!r}"
            where = ("resumed run, " if attempt else "run, ") + where
            kills.append(where)
            self.results["kills"].append(where)
            self.results["random_kills"] += chosen is None
            argv = ["train", str(directory / "run.yaml"), "--resume"]
        if code == -9:
            code = run(argv, directory / "final.txt", {})
        if code != 0:
            self.results["failures"].append(f"{directory}: a run exited {code}; see its logs")
            return
        problem = same(outcome(directory / "out"), expected)
        self.results["trials"].append({"dir": str(directory), "kills": kills, "identical": problem is None,
                                       "problem": problem})
        if problem is None:
            shutil.rmtree(directory, ignore_errors=True)


def main(plan_file: str, result_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    warm_imports()
    fuzz = Fuzz(plan)
    references = []
    for index, setting in enumerate(plan["settings"]):
        base = {**plan["config"], "train": {**plan["config"]["train"], **setting}}
        reference = fuzz.reference(index, base)
        if reference is None:
            continue
        references.append((index, base, *reference))
        for number, chosen in enumerate(plan["named"] if index == 0 else []):
            fuzz.trial(f"s{index}-named{number}", base, *reference, chosen=tuple(chosen))
        for number in range(plan["trials_per_setting"]):
            fuzz.trial(f"s{index}-t{number}", base, *reference)
    extra = 0  # more random trials until enough kills (a run may finish before its kill comes)
    while references and fuzz.results["random_kills"] < plan["min_kills"] and extra < plan["max_extra_trials"]:
        index, base, *reference = references[extra % len(references)]
        fuzz.trial(f"s{index}-extra{extra}", base, *reference)
        extra += 1
    Path(result_file).write_text(json.dumps(fuzz.results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
