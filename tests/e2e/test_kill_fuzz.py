"""kill -9 at random moments, inside checkpoint writes too, then --resume: bit-identical final weights.

tests/support/kill_fuzz.py does the work in one subprocess that imports tunelab once and forks a child per
run. Two settings whose log_every does not divide save_every (a metrics window straddles every
restart), a held-out set evaluated during training, dropout (the RNG state must resume too).
Four chosen moments come first: after step 5 (mid logging window), inside the write of the adapter
of checkpoint 4 (the file cut in half), between the last checkpoint and the pruning of the oldest
(one checkpoint too many must not stay) and during the final save (the last evaluation row must not
be written twice); then seeded random ones. The output directories must end up holding exactly the
files of the uninterrupted run: no temporary, no checkpoint more or less.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import REPO, make_config

MIN_KILLS = 20
RESULTS: dict = {}  # read by conftest's terminal summary


def test_kill_minus_9_anywhere_then_resume_is_bit_identical(tmp_path: Path, tiny_model: Path) -> None:
    rows = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a in range(8) for b in range(5)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = make_config(tmp_path, tiny_model, data, method={"type": "lora", "rank": 4, "dropout": 0.1},
                         data={"max_length": 64, "val_ratio": 0.1},
                         train={"max_steps": 8, "lr": 2e-3, "batch_tokens": 128, "precision": "fp32",
                                "eval_every": 4, "keep_checkpoints": 2})
    del config["output_dir"]
    # In memory where there is /dev/shm: fsync is free there (a kill -9 loses nothing the page cache holds).
    work = Path(tempfile.mkdtemp(prefix="tunelab-kill-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                 else tmp_path))
    plan = {
        "work": str(work / "runs"), "seed": 16, "config": config,
        "settings": [{"log_every": 3, "save_every": 2}, {"log_every": 2, "save_every": 3}],
        "named": [["step 5", ""], ["checkpoint step-4 model adapter_model.safetensors", "0.5"],
                  ["checkpoint step-8 renamed", ""], ["final final before rename", ""]],
        "trials_per_setting": 3, "kills_per_trial": 3, "timed_share": 0.3,
        "min_kills": MIN_KILLS, "max_extra_trials": 8,
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    # One thread: a tiny model gains nothing from more, and they spin against each other on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TUNELAB_CACHE": str(work / "cache"),
           "TUNELAB_HOME": str(work / "home")}
    try:
        worker = subprocess.run([sys.executable, str(REPO / "tests" / "support" / "kill_fuzz.py"), str(tmp_path / "plan.json"),
                                 str(tmp_path / "result.json")], capture_output=True, text=True, timeout=900,
                                env=env)
        assert worker.returncode == 0, worker.stderr[-3000:]
        result = json.loads((tmp_path / "result.json").read_text())
    finally:
        done = json.loads((tmp_path / "result.json").read_text()) if (tmp_path / "result.json").is_file() else None
        if done is None or done["failures"] or not all(trial["identical"] for trial in done["trials"]):
            shutil.copytree(work, tmp_path / "work", dirs_exist_ok=True)  # kept for a look at the logs
        shutil.rmtree(work, ignore_errors=True)
    trials = result["trials"]
    RESULTS.update(kills=len(result["kills"]), random=result["random_kills"], trials=len(trials),
                   identical=sum(trial["identical"] for trial in trials), points=result.get("points"))
    assert not result["failures"], result["failures"]
    assert [t["problem"] for t in trials if not t["identical"]] == []
    assert result["random_kills"] >= MIN_KILLS, result["kills"]
    assert sum("the write cut at" in kill for kill in result["kills"]) >= 3  # inside writes, not only between them
    assert sum("checkpoint" in kill for kill in result["kills"]) >= 5
    assert len(trials) >= len(plan["named"]) + 2 * plan["trials_per_setting"]


def summary_line() -> str | None:
    """The fuzz's totals for the end of the test run (conftest prints it), or None when it did not run."""
    if not RESULTS:
        return None
    return (f"kill -9 fuzz: {RESULTS['kills']} interruptions ({RESULTS['random']} at random moments) in "
            f"{RESULTS['trials']} resumed runs, {RESULTS['identical']} of {RESULTS['trials']} bit-identical to the "
            "uninterrupted run")
