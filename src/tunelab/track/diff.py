"""What differs between two runs of the registry (``tunelab runs diff`` and the UI's comparison)."""

from __future__ import annotations

from typing import Any

from tunelab.track.mlflow_log import flatten

_SKIP_IN_DIFF = ("run_id", "started_at", "finished_at", "registry", "mlflow_run_id")


def diff_runs(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Keys (dotted) whose values differ between two runs, excluding ids and times."""

    def flat(run: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in run.items() if k not in _SKIP_IN_DIFF and k not in ("inputs", "outputs")}
        for role in ("inputs", "outputs"):
            for artifact in run.get(role) or []:
                body[f"{role}.{artifact['kind']}"] = artifact["path"] + (
                    f" ({artifact['fingerprint'][:12]})" if artifact.get("fingerprint") else "")
        return flatten(body)

    left, right = flat(a), flat(b)
    return [(key, left.get(key), right.get(key)) for key in sorted(set(left) | set(right))
            if left.get(key) != right.get(key) and not key.endswith(("_seconds", "elapsed_s"))]
