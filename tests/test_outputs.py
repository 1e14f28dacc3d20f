"""Outputs are claimed, written beside and renamed; a full disk names the path; one run per output_dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bad_inputs import file_size_limit
from tunelab.outputs import OutputError, atomic_output, claim_files, claim_output, write_errors
from tunelab.train.run_lock import RunLock, RunLockedError


def test_claim_output_refuses_existing_and_inputs(tmp_path: Path) -> None:
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    assert claim_output(tmp_path / "new") == tmp_path / "new"
    assert claim_output(tmp_path / "empty") == tmp_path / "empty"  # an empty directory holds nothing to lose
    with pytest.raises(OutputError, match="already exists; choose a new path, or pass --overwrite"):
        claim_output(tmp_path / "run")
    assert claim_output(tmp_path / "run", overwrite=True)
    for out in (tmp_path / "run", tmp_path / "run" / "final"):  # never, even with --overwrite
        with pytest.raises(OutputError, match="the adapter .* that this command reads"):
            claim_output(out, True, "--out", [("adapter", tmp_path / "run" / "final")])


def test_claim_files_lists_what_exists(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("a\n")
    (tmp_path / "b.jsonl").write_text("b\n")
    claim_files([tmp_path / "c.jsonl"], inputs=[tmp_path / "a.jsonl"])
    with pytest.raises(OutputError, match=r"a.jsonl, .*b.jsonl already exist \(from an earlier run\?\)"):
        claim_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    claim_files([tmp_path / "b.jsonl"], overwrite=True)
    with pytest.raises(OutputError, match="is also an input of this command"):
        claim_files([tmp_path / "a.jsonl"], overwrite=True, inputs=[tmp_path / "a.jsonl"])


def test_atomic_output_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="exporter failed"):
        with atomic_output(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("exporter failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    assert (out / "old.txt").read_text() == "old"
    with atomic_output(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_full_disk_names_the_file_and_what_was_kept(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {"w": torch.zeros(50_000)}
    writers = {
        "python": lambda path: path.write_bytes(b"x" * 200_000),
        "torch": lambda path: torch.save(tensors, path),  # RuntimeError('... unexpected pos ...')
        "safetensors": lambda path: save_file(tensors, path),  # SafetensorError
    }
    for name, write in writers.items():
        target = tmp_path / f"{name}.out"
        with pytest.raises(OutputError) as info, file_size_limit(10_000):
            with write_errors(target, "checkpoint", kept="step-2 is intact"):
                write(target)
        message = str(info.value)
        assert message.startswith(f"{target}: cannot write the checkpoint: "), message
        assert message.endswith("Kept: step-2 is intact."), message
    with pytest.raises(ValueError):  # anything else is not a disk problem and passes through
        with write_errors(tmp_path / "x", "output"):
            raise ValueError("a bug")


def test_second_lock_is_refused_and_a_stale_one_taken_over(tmp_path: Path) -> None:
    notes: list[str] = []
    with RunLock(tmp_path, notify=notes.append):
        owner = json.loads((tmp_path / ".tunelab.lock").read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"is in use by another run: pid {os.getpid()} on host "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".tunelab.lock").exists()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    owner["pid"] = dead
    (tmp_path / ".tunelab.lock").write_text(json.dumps(owner))
    with RunLock(tmp_path, notify=notes.append):
        pass
    assert notes == [notes[0]] and notes[0].startswith(f"took over the lock of pid {dead} on host ")
    assert notes[0].endswith("no longer running")


def test_lock_held_by_a_killed_process_is_free(tmp_path: Path) -> None:
    """flock dies with its process: kill -9 of a run leaves a lock file, not a lock."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from tunelab.train.run_lock import RunLock\n"
        "RunLock(sys.argv[2]).acquire(); print('locked', flush=True); sys.stdin.read()"),
        str(Path(__file__).resolve().parent.parent / "src"), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait(timeout=30)
    notes: list[str] = []
    with RunLock(tmp_path, notify=notes.append):
        assert f"pid {holder.pid}" in notes[0]
