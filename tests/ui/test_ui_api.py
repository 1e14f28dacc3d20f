"""tunelab ui's HTTP surface without a browser: the token off loopback, no cross-site writes, the schema form
and its validation, readable errors, and the command that starts it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import REPO
from tunelab.ui.app import create_ui_app
from tunelab.ui.launch import form_to_dict, schema_sections
from tunelab.ui.state import UISettings

WRITE = {"X-Tunelab-UI": "1"}


def client(tmp_path, token=None, host="127.0.0.1:7860") -> TestClient:
    settings = UISettings(registry=tmp_path / "runs.db", state_dir=tmp_path / "ui", workdir=tmp_path, token=token)
    return TestClient(create_ui_app(settings), base_url=f"http://{host}")


def test_a_token_is_required_when_set_and_kept_in_a_cookie(tmp_path):
    with client(tmp_path, token="s3cret", host="10.0.0.5:7860") as ui:
        refused = ui.get("/api/runs")
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        assert ui.get("/api/runs", params={"token": "wrong"}).status_code == 401
        first = ui.get("/", params={"token": "s3cret"})
        assert first.status_code == 200 and "tunelab_ui_token=s3cret" in first.headers["set-cookie"]
        assert "HttpOnly" in first.headers["set-cookie"]
        assert ui.get("/api/runs").status_code == 200  # the cookie from now on
    with client(tmp_path, token="s3cret", host="10.0.0.5:7860") as api:
        assert api.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_loopback_only_without_a_token_and_no_cross_site_writes(tmp_path):
    with client(tmp_path, host="evil.example:7860") as ui:
        assert ui.get("/api/runs").status_code == 403  # DNS rebinding: a foreign Host header
    with client(tmp_path) as ui:
        assert ui.get("/api/runs").status_code == 200
        refused = ui.post("/api/validate", json={"config_path": "x.yaml"})
        assert refused.status_code == 403 and "X-Tunelab-UI" in refused.json()["error"]
        assert ui.post("/api/validate", json={"config_path": "x.yaml"}, headers=WRITE).status_code == 200


def test_the_form_is_the_schema_and_validation_speaks_like_tunelab_train(tmp_path, tiny_model):
    fields = {f["key"]: f for s in schema_sections() for f in s["fields"]}
    assert fields["train.lr"]["kind"] == "float" and fields["train.lr"]["default"] == 2e-4
    assert fields["method.type"]["kind"] == "choice" and "qlora" in fields["method.type"]["choices"]
    assert fields["model.path"]["required"] and fields["model.tiny.hidden"]["kind"] == "int"
    assert form_to_dict({"train.lr": "1e-3", "data.train": "a.jsonl", "model.path": "m", "train.max_steps": ""}) == {
        "train": {"lr": 1e-3}, "data": {"train": "a.jsonl"}, "model": {"path": "m"}}
    with client(tmp_path) as ui:
        body = {"form": {"model.path": str(tiny_model), "data.train": "d.jsonl", "output_dir": str(tmp_path / "o"),
                         "train.lr": "-1"}, "overrides": ["train.lrr=1e-3"]}
        result = ui.post("/api/validate", json=body, headers=WRITE).json()
        assert not result["valid"]
        by_key = {e["key"]: e["message"] for e in result["errors"]}
        assert "did you mean 'train.lr'" in by_key["train.lrr"] and by_key["train.lrr"].startswith("command line")
        assert "greater than 0" in by_key["train.lr"] and by_key["train.lr"].startswith("form")
        started = ui.post("/api/launch", json=body, headers=WRITE).json()
        assert started == {"started": False, "errors": result["errors"]}
        assert ui.get("/api/jobs").json()["jobs"] == []
        missing = ui.post("/api/validate", json={"config_path": str(tmp_path / "nope.yaml")}, headers=WRITE).json()
        assert missing["errors"][0]["message"].endswith("config file not found")


def test_user_errors_are_readable_json_and_the_server_keeps_serving(tmp_path):
    with client(tmp_path) as ui:
        assert ui.get("/api/runs/train-nope").json()["error"].startswith("no run registry at")
        assert ui.post("/api/jobs/train-job-9/stop", headers=WRITE).json()["error"].startswith("no job 'train-job-9'")
        assert "no compare results" in ui.get("/api/compare", params={"path": str(tmp_path)}).json()["error"]
        assert "no request store" in ui.get("/api/monitor/summary", params={"db": str(tmp_path / "x.db")}).json()["error"]
        bad = ui.post("/api/playground/load", json={"path": str(tmp_path)}, headers=WRITE)
        assert bad.status_code == 400 and "neither a model" in bad.json()["error"]
        assert ui.post("/api/playground/m/nokey/v1/chat/completions", json={}, headers=WRITE).status_code == 404
        assert ui.get("/api/health").json()["status"] == "ok"
        assert not (tmp_path / "runs.db").exists()


def test_tunelab_ui_command_off_loopback_prints_a_token_url_and_stops_on_sigterm(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--host", "0.0.0.0", "--port", "0",
                                "--runs-db", str(tmp_path / "runs.db")], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://HOST:(\d+)/\?token=(\S+)", line)
        assert match, line
        port, token = match.groups()
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs").status_code == 401
        answer = httpx.get(f"http://127.0.0.1:{port}/api/runs", params={"token": token})
        assert answer.status_code == 200 and answer.json()["runs"] == []
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_host_names_are_accepted(tmp_path, host):
    with client(tmp_path, host=f"{host}:7860") as ui:
        assert ui.get("/api/health").status_code == 200


def test_live_metrics_are_read_by_whole_lines_from_an_offset(tmp_path):
    from tunelab.ui.runs import read_metrics_from

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # the trainer is writing row 2
    rows, offset = read_metrics_from(path)
    assert rows == [{"step": 1, "loss": 2.0}] and offset == len('{"step": 1, "loss": 2.0}\n')
    with path.open("a") as handle:
        handle.write('ss": 1.5}\n')
    rows, offset = read_metrics_from(path, offset)
    assert rows == [{"step": 2, "loss": 1.5}] and offset == path.stat().st_size
    path.write_text('{"step": 1, "loss": 2.0}\n')  # a resumed run rewrote the file shorter
    rows, _ = read_metrics_from(path, offset)
    assert rows == [{"step": 1, "loss": 2.0}]


def test_length_histogram_bins_whole_tokens():
    import numpy as np

    from tunelab.ui.data import length_histogram

    histogram = length_histogram(np.array([94, 95, 100, 116, 116]))
    assert histogram["edges"][0] == 94 and all(b - a == 2 for a, b in zip(histogram["edges"], histogram["edges"][1:]))
    assert sum(histogram["counts"]) == 5 and histogram["counts"][-1] == 2
