"""What produced a run: package versions, the git commit, a fresh run id, file fingerprints."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(directory: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``directory`` (the current directory), if any."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def new_run_id(kind: str) -> str:
    """A readable, unique run id such as ``train-20261128-103000-3f2a``."""
    return f"{kind}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def files_fingerprint(paths: list[str]) -> str:
    """A content hash over data files (a hub dataset id hashes its name)."""
    digest = hashlib.sha256()
    for name in paths:
        path = Path(name).expanduser()
        digest.update(name.encode() + b"\0")
        if path.is_file():
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def tunelab_home() -> Path:
    """``$TUNELAB_HOME``, by default ``~/.tunelab``: the registry and monitoring stores live here."""
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".tunelab").expanduser()
