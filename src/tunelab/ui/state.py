"""What the UI's routers share: its settings, the job manager, the playground's models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from tunelab.track.registry import Registry
from tunelab.ui.jobs import JobManager
from tunelab.ui.model_pool import ModelPool


@dataclass
class UISettings:
    """Where the UI reads and writes.

    Attributes:
        registry: the run registry file (``--runs-db``).
        state_dir: the UI's own files (jobs and their logs, playground labels); default: beside the registry.
        workdir: the directory launched commands run in (relative paths in configs are relative to it).
        poll_ms: how often pages poll a running job or run (milliseconds).
        max_models: playground models kept loaded at once (the oldest is unloaded first).
        token: required on every request when set (a host other than loopback).
    """

    registry: Path
    state_dir: Path
    workdir: Path = field(default_factory=Path.cwd)
    poll_ms: int = 1000
    max_models: int = 2
    token: str | None = None


class UIState:
    """One per app: settings, jobs and loaded models."""

    def __init__(self, settings: UISettings) -> None:
        self.settings = settings
        self.jobs = JobManager(settings.state_dir, settings.registry, settings.workdir)
        self.models = ModelPool(settings.max_models)

    def registry(self) -> Registry:
        """The registry (its file is not created by reading)."""
        return Registry(self.settings.registry)

    def close(self) -> None:
        """Unload models; leave running jobs running."""
        self.models.close()
        self.jobs.close()


def ui_state(request: Request) -> UIState:
    """The app's state (a FastAPI dependency)."""
    return request.app.state.ui
