"""Checkpoints verify against their manifest; resume takes the newest one that does and says what it skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab.train.checkpoint import find_resumable, remove_unfinished, verify_checkpoint, write_manifest
from tunelab.train.reporting import read_metrics, read_metrics_report


def fake_checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    path = root / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    (path / "optimizer.pt").write_bytes(os.urandom(4000))
    (path / "sub").mkdir()
    (path / "sub" / "shard.bin").write_bytes(b"shard" * 100)
    if manifest:
        write_manifest(path)
    return path


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path: Path) -> None:
    oldest, middle, newest = (fake_checkpoint(tmp_path, step) for step in (2, 4, 6))
    assert find_resumable(tmp_path) == (newest, [])
    os.truncate(newest / "optimizer.pt", 1000)
    (middle / "sub" / "shard.bin").write_bytes(b"SHARD" * 100)  # same size, other bytes
    found, skipped = find_resumable(tmp_path)
    assert found == oldest
    assert skipped == [(newest, "optimizer.pt is 1,000 bytes, the manifest says 4,000 (truncated or changed)"),
                       (middle, "sub/shard.bin does not match its SHA-256 in the manifest (corrupted)")]


def test_missing_files_and_manifests(tmp_path: Path) -> None:
    checkpoint = fake_checkpoint(tmp_path, 3)
    (checkpoint / "sub" / "shard.bin").unlink()
    assert verify_checkpoint(checkpoint) == "sub/shard.bin is missing"
    (checkpoint / "manifest.json").write_text('{"version": 1, "files": {"trainer_st')  # cut short
    assert verify_checkpoint(checkpoint).startswith("manifest.json is unreadable")
    legacy = fake_checkpoint(tmp_path, 5, manifest=False)  # written before manifests: checked by structure
    assert verify_checkpoint(legacy) == "optimizer.pt is empty or truncated (4,000 bytes)"  # not a zip archive
    (legacy / "trainer_state.json").unlink()
    assert verify_checkpoint(legacy) == "trainer_state.json is missing (an unfinished checkpoint)"


def test_leftovers_of_a_killed_save_are_removed_and_nothing_else(tmp_path: Path) -> None:
    kept = fake_checkpoint(tmp_path, 2)
    for name in (".tmp-step-4", ".delete-step-0", ".old-step-2", "step-3.corrupt"):
        (tmp_path / "checkpoints" / name).mkdir()
    removed = remove_unfinished(tmp_path)
    assert sorted(p.name for p in removed) == [".delete-step-0", ".old-step-2", ".tmp-step-4"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3.corrupt"]
    assert verify_checkpoint(kept) is None


def test_metrics_with_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert read_metrics_report(path)[1] == [3]
