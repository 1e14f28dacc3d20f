"""Background commands started from the UI (train, eval, compare): start, follow the log, stop, resume.

Each job is a ``python -m tunelab ...`` subprocess in its own session, its output in a log file,
its record in ``jobs.json`` (kept atomically, so the list survives a restart of the UI). The
launched run registers into the UI's registry (``TUNELAB_REGISTRY``). Stop sends SIGTERM: a
training run then saves a checkpoint of its current step and exits (:mod:`tunelab.train.stop`);
resume starts the same config again with ``--resume``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.train.stop import TrainingStopped

MAX_LOG_CHUNK = 256 * 1024  # bytes of log sent per request


@dataclass
class Job:
    """One launched command and what is known about it."""

    id: str
    kind: str  # train | eval | compare
    argv: list[str]  # after ``python -m tunelab``
    cwd: str
    log: str
    started_at: str
    title: str
    output_dir: str | None = None  # where the command writes (train: output_dir; eval/compare: --out)
    config: str | None = None  # the training config file
    pid: int | None = None
    status: str = "running"  # running | stopping | finished | stopped | failed | lost
    returncode: int | None = None
    finished_at: str | None = None
    resumed_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The job as the API shows it, with the command line to run it by hand."""
        return asdict(self) | {"command": " ".join(["tunelab", *self.argv])}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobManager:
    """The UI's background commands (thread-safe)."""

    def __init__(self, state_dir: Path, registry: Path, workdir: Path) -> None:
        self.dir = state_dir / "jobs"
        self.registry, self.workdir = registry, workdir
        self.file = self.dir / "jobs.json"
        self.lock = threading.Lock()
        self.processes: dict[str, subprocess.Popen] = {}
        self.jobs: dict[str, Job] = {}
        if self.file.is_file():
            try:
                rows = json.loads(self.file.read_text(encoding="utf-8"))
                self.jobs = {row["id"]: Job(**row) for row in rows}
            except (ValueError, TypeError, KeyError) as exc:
                broken = self.file.with_name(f"jobs.json.broken-{datetime.now(UTC):%Y%m%dT%H%M%S}")
                self.file.rename(broken)
                print(f"tunelab ui: {self.file} was unreadable ({exc}); moved to {broken}", file=sys.stderr)

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(".jobs.json.tmp")
        tmp.write_text(json.dumps([asdict(j) for j in self.jobs.values()], indent=1), encoding="utf-8")
        os.replace(tmp, self.file)

    def start(self, kind: str, argv: list[str], title: str, output_dir: str | None = None, config: str | None = None,
              resumed_from: str | None = None, extra: dict[str, Any] | None = None) -> Job:
        """Start ``python -m tunelab ARGV`` in the background and return its job."""
        with self.lock:
            number = 1 + max((int(j.split("-")[-1]) for j in self.jobs), default=0)
            job_id = f"{kind}-job-{number}"
            self.dir.mkdir(parents=True, exist_ok=True)
            log = self.dir / f"{job_id}.log"
            env = os.environ | {"TUNELAB_REGISTRY": str(self.registry), "PYTHONUNBUFFERED": "1",
                                "COLUMNS": "160", "TERM": "dumb"}
            with log.open("wb") as handle:
                process = subprocess.Popen([sys.executable, "-m", "tunelab", *argv], cwd=self.workdir, env=env,
                                           stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            job = Job(job_id, kind, argv, str(self.workdir), str(log), _now(), title, output_dir, config, process.pid,
                      resumed_from=resumed_from, extra=extra or {})
            self.jobs[job_id] = job
            self.processes[job_id] = process
            self._save()
            return job

    def _refresh(self, job: Job) -> None:
        if job.status not in ("running", "stopping"):
            return
        process = self.processes.get(job.id)
        if process is not None:
            code = process.poll()
            if code is None:
                return
        elif job.pid is not None and _alive(job.pid):
            return  # started by an earlier UI process and still going
        else:
            code = None
        job.returncode, job.finished_at = code, _now()
        if code == 0:
            job.status = "finished"
        elif code == TrainingStopped.exit_code or (job.status == "stopping" and code in (-signal.SIGTERM, 143)):
            job.status = "stopped"
        elif code is None:
            job.status = "finished" if job.output_dir and (Path(job.output_dir) / "run.json").is_file() else "lost"
        else:
            job.status = "failed"
        self.processes.pop(job.id, None)
        self._save()

    def get(self, job_id: str) -> Job:
        """A job by id (its status refreshed).

        Raises:
            TunelabError: no such job.
        """
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise TunelabError(f"no job {job_id!r} (see the Launch page for the jobs of this UI)")
            self._refresh(job)
            return job

    def list(self, kind: str | None = None) -> list[Job]:
        """Every job (of one kind), newest first, with fresh statuses."""
        with self.lock:
            for job in self.jobs.values():
                self._refresh(job)
            jobs = [j for j in self.jobs.values() if kind is None or j.kind == kind]
        return sorted(jobs, key=lambda j: (j.started_at, int(j.id.split("-")[-1])), reverse=True)

    def stop(self, job_id: str) -> Job:
        """Ask a running job to stop (SIGTERM): a training run saves a checkpoint first."""
        job = self.get(job_id)
        with self.lock:
            if job.status not in ("running", "stopping") or job.pid is None:
                raise TunelabError(f"job {job_id} is not running ({job.status})")
            try:
                os.kill(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            job.status = "stopping"
            self._save()
        return job

    def read_log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """The log from byte ``offset`` (at most :data:`MAX_LOG_CHUNK`), and the offset to ask for next."""
        job = self.get(job_id)
        path = Path(job.log)
        if not path.is_file():
            return "", offset
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(MAX_LOG_CHUNK)
        # Progress bars redraw with carriage returns; show the last state of each line.
        text = "\n".join(line.rsplit("\r", 1)[-1] for line in data.decode("utf-8", "replace").split("\n"))
        return text, offset + len(data)

    def close(self) -> None:
        """Forget the child processes (they keep running; a later UI finds them by pid)."""
        with self.lock:
            self.processes.clear()
