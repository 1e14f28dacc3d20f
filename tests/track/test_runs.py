"""Run tracking: run.json and the registry for train/eval/merge/export/serve, tunelab runs, lineage, MLflow."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from conftest import ARITHMETIC_TEST, ARITHMETIC_TRAIN, make_config, write_config
from tunelab.cli import main
from tunelab.config import config_from_dict
from tunelab.errors import ConfigError
from tunelab.monitor.serving import start_serve_monitoring
from tunelab.track.lineage import lineage_tree
from tunelab.track.record import Artifact, record_run
from tunelab.track.registry import Registry, TrackError


def run_id_of(path: Path) -> str:
    return json.loads(path.read_text())["run_id"]


@pytest.fixture(scope="module")
def chain(tiny_model, tmp_path_factory):
    """Quickstart-like: train a LoRA adapter -> merge -> export GGUF -> eval -> serve (registered)."""
    tmp = tmp_path_factory.mktemp("chain")
    config = make_config(tmp, tiny_model, ARITHMETIC_TRAIN, data={"eval": str(ARITHMETIC_TEST), "max_samples": 64},
                         train={"max_steps": 2, "log_every": 1, "seed": 0})
    assert main(["train", str(write_config(tmp, config))]) == 0
    out = Path(config["output_dir"])
    assert main(["merge", "--adapter", str(out / "final"), "--out", str(tmp / "merged")]) == 0
    assert main(["export", "--format", "gguf", "--model", str(tmp / "merged"), "--out", str(tmp / "model.gguf"),
                 "--outtype", "f32"]) == 0
    assert main(["eval", "--model", str(tmp / "merged"), "--data", str(ARITHMETIC_TEST), "--out", str(tmp / "eval"),
                 "--max-samples", "4", "--max-new-tokens", "4", "--metrics", "exact_match"]) == 0
    monitoring = start_serve_monitoring(str(tmp / "merged"), "merged")
    serve_id = monitoring.register(str(tmp / "merged"), {}, {"name": "merged"})
    monitoring.close()
    return {"tmp": tmp, "out": out, "config": config, "train": run_id_of(out / "run.json"),
            "merge": run_id_of(tmp / "merged" / "run.json"), "export": run_id_of(tmp / "model.gguf.run.json"),
            "eval": run_id_of(tmp / "eval" / "run.json"), "serve": serve_id}


def test_every_stage_writes_run_json_linked_to_its_parent(chain):
    registry = Registry()
    train, merge = registry.get(chain["train"]), registry.get(chain["merge"])
    export, evaluation, serve = registry.get(chain["export"]), registry.get(chain["eval"]), registry.get(chain["serve"])
    assert train["parent"] is None and train["inputs"][0]["kind"] == "dataset"
    assert train["inputs"][0]["fingerprint"] == train["data_fingerprint"]
    assert train["outputs"] == [{"kind": "adapter", "path": str((chain["out"] / "final").resolve()), "fingerprint": None}]
    assert train["config"]["train"]["max_steps"] == 2 and train["git_commit"] and train["versions"]["torch"]
    assert "eval_loss" in train["metrics"]
    assert merge["parent"] == chain["train"] and merge["inputs"][0]["run_id"] == chain["train"]
    assert export["parent"] == chain["merge"] and export["config"]["format"] == "gguf"
    assert export["metrics"]["n_tensors"] > 0
    assert evaluation["parent"] == chain["merge"] and "exact_match" in evaluation["metrics"]
    assert serve["parent"] == chain["merge"] and serve["status"] == "stopped"
    assert json.loads((chain["out"] / "run.json").read_text())["registry"] == str(registry.path)


def test_lineage_shows_the_whole_chain(chain, capsys):
    assert main(["runs", "lineage", chain["serve"]]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    order = ["dataset", f"train {chain['train']}", "adapter", f"merge {chain['merge']}", "model",
             f"serve {chain['serve']}"]
    positions = [next(i for i, line in enumerate(lines) if line.lstrip("│├└─ ").startswith(word)) for word in order]
    assert positions == sorted(positions), text
    assert lines[positions[-1]].endswith("<-")  # the run asked about
    assert chain["export"] not in text  # above the asked run, only its own branch

    tree = lineage_tree(Registry(), chain["train"][:-2])  # a unique prefix works too
    kinds = [node.kind for node in tree.walk()]
    assert kinds[:5] == ["dataset", "train", "adapter", "merge", "model"]
    below_model = {node.run_id for node in tree.walk() if node.kind in ("export", "eval", "serve") and node.run_id}
    assert below_model == {chain["export"], chain["eval"], chain["serve"]}


def test_runs_list_show_and_diff(chain, tiny_model, tmp_path, capsys):
    assert main(["runs", "list", "--kind", "merge", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert chain["merge"] in [r["run_id"] for r in listed] and {r["kind"] for r in listed} == {"merge"}
    assert main(["runs", "show", chain["merge"]]) == 0
    shown = capsys.readouterr().out
    used_by = next(line for line in shown.splitlines() if line.startswith("used by: "))
    assert f"(from {chain['train']})" in shown
    assert set(used_by.removeprefix("used by: ").split(", ")) == {chain["export"], chain["eval"], chain["serve"]}

    config = {**chain["config"], "output_dir": str(tmp_path / "other"),
              "train": {**chain["config"]["train"], "lr": 5e-4}}
    assert main(["train", str(write_config(tmp_path, config))]) == 0
    other = run_id_of(tmp_path / "other" / "run.json")
    capsys.readouterr()
    assert main(["runs", "diff", chain["train"], other, "--json"]) == 0
    keys = {row["key"]: row for row in json.loads(capsys.readouterr().out)}
    assert keys["config.train.lr"]["a"] == 1e-3 and keys["config.train.lr"]["b"] == 5e-4
    assert "config.output_dir" in keys and any(k.startswith("metrics.") for k in keys)
    assert "data_fingerprint" not in keys and not any(k.startswith("versions.") for k in keys)


def test_unknown_and_ambiguous_ids_and_a_corrupt_registry(chain, tmp_path, capsys, caplog):
    assert main(["runs", "show", "train-19990101"]) == 2
    assert "no run 'train-19990101'" in capsys.readouterr().err
    registry = Registry()
    record_run("eval", None, inputs=[], outputs=[])
    record_run("eval", None, inputs=[], outputs=[])
    with pytest.raises(TrackError, match="ambiguous"):
        registry.get("eval-")

    corrupt = tmp_path / "runs.db"
    corrupt.write_bytes(b"not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="tunelab.track"):
        info = record_run("export", tmp_path / "run.json", inputs=[Artifact("model", str(tmp_path))],
                          outputs=[Artifact("export", str(tmp_path / "x"))], registry=corrupt)
    assert "corrupt" in caplog.text and run_id_of(tmp_path / "run.json") == info["run_id"]  # run.json is kept
    assert main(["runs", "--registry", str(corrupt), "list"]) == 2
    assert "move it aside" in capsys.readouterr().err


class FakeMlflow(types.ModuleType):
    """Records the calls tunelab makes to mlflow."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.calls: list[tuple] = []

    def set_tracking_uri(self, uri):
        self.calls.append(("uri", uri))

    def set_experiment(self, name):
        self.calls.append(("experiment", name))

    def start_run(self, run_name, tags):
        self.calls.append(("start", run_name, tags))
        outer = self

        class Run:
            info = types.SimpleNamespace(run_id="mlflow-123")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                outer.calls.append(("end",))

        return Run()

    def log_params(self, params):
        self.calls.append(("params", params))

    def log_metrics(self, metrics):
        self.calls.append(("metrics", metrics))

    def log_dict(self, data, name):
        self.calls.append(("dict", name, data["run_id"]))


def test_mlflow_gets_config_metrics_and_lineage_tags(tmp_path, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    info = record_run("merge", tmp_path / "run.json", inputs=[Artifact("adapter", "a")], outputs=[],
                      config={"train": {"lr": 0.001}, "dtype": "float32"}, metrics={"loss": 0.5, "ok": True, "n": "x"},
                      mlflow_uri="http://127.0.0.1:5000", mlflow_experiment="exp")
    names = [c[0] for c in fake.calls]
    assert names == ["uri", "experiment", "start", "params", "metrics", "dict", "end"]
    start = fake.calls[2]
    assert start[1] == info["run_id"] and start[2]["tunelab.kind"] == "merge"
    assert fake.calls[3][1] == {"train.lr": "0.001", "dtype": "float32"}
    assert fake.calls[4][1] == {"loss": 0.5}
    assert json.loads((tmp_path / "run.json").read_text())["mlflow_run_id"] == "mlflow-123"


def test_missing_mlflow_is_a_clear_error(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(TrackError, match=r"pip install 'tunelab\[track\]'"):
        record_run("export", tmp_path / "run.json", inputs=[], outputs=[], mlflow_uri="http://127.0.0.1:5000")
    assert (tmp_path / "run.json").is_file()  # the record is written before MLflow is tried
    monkeypatch.delitem(sys.modules, "mlflow")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "mlflow" else object())
    config = make_config(tmp_path, tiny_model, ARITHMETIC_TRAIN, track={"mlflow_uri": "http://127.0.0.1:5000"})
    with pytest.raises(ConfigError, match=r"track.mlflow_uri.*pip install 'tunelab\[track\]'"):
        config_from_dict(config)


def test_an_unreachable_mlflow_server_is_a_warning(tmp_path, monkeypatch, caplog):
    fake = FakeMlflow()

    def refuse(uri):
        raise ConnectionError("connection refused")

    fake.set_experiment = refuse
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    with caplog.at_level(logging.WARNING, logger="tunelab.track"):
        info = record_run("eval", tmp_path / "run.json", inputs=[], outputs=[], mlflow_uri="http://127.0.0.1:9")
    assert "could not log run" in caplog.text and "connection refused" in caplog.text
    assert "mlflow_run_id" not in info and run_id_of(tmp_path / "run.json") == info["run_id"]
