"""tunelab ui in a real browser (headless Debian Chromium through Playwright), against a registry made by
real tiny runs: the numbers on each page equal the files, a live curve grows, runs launch, stop and
resume, a chat answer streams, and bad input gives a readable message while the server keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ARITHMETIC_TEST, ARITHMETIC_TRAIN, make_config, read_jsonl, write_config
from tunelab.cli import main
from tunelab.ui.state import UISettings
from ui_support import assert_fits_width, chromium, goto, shown_number, ui_server, wait_until


def _last_loss(out: Path) -> float:
    return [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row][-1]


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """Two tiny LoRA runs, their evaluations and a comparison, a request store, and the UI on them."""
    from tunelab.eval.compare import run_compare
    from tunelab.monitor.report import build_report
    from tunelab.monitor.store import RequestStore, write_drift_checks
    from tunelab.serve.request_log import RequestRecord

    tmp = tmp_path_factory.mktemp("ui")
    registry = tmp / "runs.db"
    eval_file = tmp / "eval.jsonl"
    eval_file.write_text("".join(ARITHMETIC_TEST.read_text().splitlines(keepends=True)[:12]))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNELAB_REGISTRY", str(registry))
        runs = {}
        for name, lr in (("a", 1e-3), ("b", 3e-3)):
            config = make_config(tmp / name, tiny_model, ARITHMETIC_TRAIN,
                                 data={"eval": str(eval_file), "max_samples": 32},
                                 train={"max_steps": 3, "lr": lr}, track={"registry": str(registry)})
            path = write_config(tmp, config, f"{name}.yaml")
            assert main(["train", str(path)]) == 0
            out = Path(config["output_dir"])
            assert main(["eval", "--model", str(out / "final"), "--data", str(eval_file), "--out",
                         str(tmp / f"eval-{name}"), "--max-samples", "6", "--max-new-tokens", "6",
                         "--metrics", "exact_match,chrf"]) == 0
            runs[name] = {"config": path, "out": out, "run": json.loads((out / "run.json").read_text()),
                          "eval": tmp / f"eval-{name}"}
        compare = run_compare([f"a={tmp / 'eval-a' / 'predictions.jsonl'}", f"b={tmp / 'eval-b' / 'predictions.jsonl'}"],
                              "metric:chrf", tmp / "compare", resamples=200)
        # A request store as tunelab serve writes it: two hours of traffic, a slow tail, errors, one drift check.
        db = tmp / "monitor" / "served.db"
        store = RequestStore(db)
        start = 1_760_000_000.0
        for k in range(240):
            store.record(RequestRecord(time=start + 30 * k, model="m", endpoint="chat", status=500 if k % 40 == 0 else 200,
                                       prompt_tokens=20 + k % 7, completion_tokens=10 + k % 13,
                                       latency_s=0.1 + (k % 10) * 0.02 + (1.5 if k % 50 == 0 else 0.0),
                                       time_to_first_token_s=0.05, mean_logprob=-1.0 - (k % 5) * 0.1))
        store.record_alert(start + 3600, "latency", "latency_p95", 1.6, 0.3, 5.2, "latency_p95 1.6 s is far above 0.3 s")
        store.close()
        write_drift_checks(db, [{"time": start + 7000, "reference": "eval.jsonl", "window_s": 3600.0,
                                 "feature": "input_length", "n_reference": 100, "n_recent": 120, "ks_statistic": 0.31,
                                 "ks_pvalue": 0.0004, "psi": 0.27, "drift": 1}])
        build_report(db, tmp / "monitor-report")
        settings = UISettings(registry=registry, state_dir=tmp / "ui-state", workdir=tmp, poll_ms=300)
        with ui_server(settings) as url, chromium() as browser:
            yield {"tmp": tmp, "url": url, "browser": browser, "registry": registry, "runs": runs,
                   "compare": tmp / "compare", "compare_results": compare, "db": db,
                   "report": json.loads((tmp / "monitor-report" / "summary.json").read_text()),
                   "eval_file": eval_file, "model": tiny_model, "settings": settings}


@pytest.fixture
def page(world):
    """A fresh browser tab; JavaScript errors on it fail the test."""
    tab = world["browser"].new_page(viewport={"width": 1366, "height": 800})
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert not errors, errors


def test_runs_table_and_run_page_show_the_files_numbers(world, page):
    a, b = world["runs"]["a"], world["runs"]["b"]
    goto(page, f"{world['url']}/#/runs")
    row = page.locator(f"tr[data-run='{a['run']['run_id']}']")
    assert shown_number(row.locator("td[data-metric='eval_loss']").inner_text()) == pytest.approx(
        a["run"]["metrics"]["eval_loss"], rel=5e-4)
    assert "lora" in row.inner_text() and "sft" in row.inner_text()
    # Sorting by eval_loss puts the runs in the registry's order of that number; filtering narrows the table.
    page.locator("th button", has_text="eval_loss").click()
    ids = page.locator("#runs-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.run)")
    expected = sorted((r["run"] for r in (a, b)), key=lambda r: r["metrics"]["eval_loss"])
    assert [i for i in ids if i.startswith("train")] == [r["run_id"] for r in expected]
    page.keyboard.press("/")
    page.keyboard.type(b["run"]["run_id"])
    wait_until(lambda: page.locator("#runs-table tbody tr").count() == 1, 10, what="the filter")
    assert_fits_width(page)

    goto(page, f"{world['url']}/#/run/{a['run']['run_id']}")
    final = page.get_by_test_id("final-loss")
    assert float(final.get_attribute("data-value")) == _last_loss(a["out"])
    assert shown_number(final.inner_text()) == pytest.approx(_last_loss(a["out"]), rel=5e-4)
    assert float(page.get_by_test_id("metric-eval_loss").get_attribute("data-value")) == a["run"]["metrics"]["eval_loss"]
    rows = read_jsonl(a["out"] / "metrics.jsonl")
    loss_chart = page.locator("figure[data-metric='loss'] svg")
    assert int(loss_chart.get_attribute("data-points")) == sum(("loss" in r) + ("eval_loss" in r) for r in rows)
    for metric in ("lr", "grad_norm", "tokens_per_s", "eval_ppl"):
        assert page.locator(f"figure[data-metric='{metric}']").count() == 1
    loss_chart.focus()  # hover values by keyboard
    page.keyboard.press("ArrowLeft")
    assert f"step {rows[-1]['step']}" in page.locator("figure[data-metric='loss'] .tip").inner_text()
    assert "checkpoints/step-3" in page.locator("#checkpoints").inner_text()
    lineage = page.locator("#lineage").inner_text()
    assert "DATASET" in lineage.upper() and a["run"]["run_id"] in lineage and "ADAPTER" in lineage.upper()
    assert f"lr: {a['run']['config']['train']['lr']}" in page.get_by_test_id("config").inner_text()
    assert "sequences from 32 records" in page.locator("main").inner_text()  # the data report
    assert_fits_width(page)

    # Two runs overlaid, with what differs between them.
    goto(page, f"{world['url']}/#/overlay?ids={a['run']['run_id']},{b['run']['run_id']}")
    legend = page.locator("figure[data-metric='loss'] .legend").inner_text()
    assert a["run"]["run_id"] in legend and b["run"]["run_id"] in legend
    lr_row = page.locator("#diff tr", has_text="config.train.lr").inner_text()
    assert "0.001" in lr_row and "0.003" in lr_row
    assert_fits_width(page)


def test_launch_watch_a_live_curve_stop_and_resume(world, page):
    config = make_config(world["tmp"] / "live", world["model"], ARITHMETIC_TRAIN,
                         data={"max_samples": 64}, train={"max_steps": 5000, "lr": 1e-3})
    path = write_config(world["tmp"], config, "live.yaml")
    goto(page, f"{world['url']}/#/launch")
    page.fill("#config-path", str(path))
    page.get_by_test_id("config-valid").wait_for()
    page.click("#launch")
    page.wait_for_function("location.hash.startsWith('#/run/train-job-')")
    chart = page.locator("figure[data-metric='loss'] svg")

    def points() -> int:
        return int(chart.get_attribute("data-points") or 0) if chart.count() else 0

    first = wait_until(lambda: points() >= 2 and points(), 120, 0.1, "the first points of the live curve")
    wait_until(lambda: points() > first + 2, 60, 0.1, "the live curve to grow without a reload")
    page.click("#stop")
    page.locator("[data-testid=run-status] .badge.stopped").wait_for(timeout=60_000)
    log = page.get_by_test_id("job-log").inner_text()
    assert "stopped by SIGTERM after step" in log
    step = int(log.split("stopped by SIGTERM after step ")[1].split()[0])
    out = Path(config["output_dir"])
    assert (out / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()  # the checkpoint on stop is kept

    stopped_hash = page.evaluate("location.hash")
    page.click("#resume")
    page.wait_for_function(f"location.hash.startsWith('#/run/train-job-') && location.hash !== '{stopped_hash}'")
    page.wait_for_selector("main[data-ready]")
    wait_until(lambda: f"resumed from {out / 'checkpoints' / f'step-{step}'}" in page.get_by_test_id("job-log").inner_text(),
               120, 0.1, "the resumed run to load its checkpoint")
    wait_until(lambda: read_jsonl(out / "metrics.jsonl")[-1]["step"] > step, 60, 0.1, "a step after the checkpoint")
    page.click("#stop")
    page.locator("[data-testid=run-status] .badge.stopped").wait_for(timeout=60_000)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one uninterrupted series of steps


def test_config_errors_from_the_form_are_shown_inline(world, page):
    goto(page, f"{world['url']}/#/launch")
    page.click("#tab-form")
    page.fill("#f-model-path", str(world["model"]))
    page.fill("#f-data-train", str(ARITHMETIC_TRAIN))
    page.fill("#f-output_dir", str(world["tmp"] / "from-form"))
    page.fill("#f-train-lr", "-1")
    page.fill("#overrides", "train.lrr=1e-3")
    errors = page.get_by_test_id("config-errors")
    wait_until(lambda: errors.count() and "did you mean 'train.lr'" in errors.inner_text(), 20, what="the validation")
    field = page.locator(".field[data-key='train.lr']")
    assert "greater than 0" in field.locator(".field-error").inner_text()
    assert "invalid" in field.get_attribute("class")
    page.click("#launch")
    assert page.get_by_test_id("config-errors").is_visible()
    assert not (world["tmp"] / "from-form").exists()  # nothing started
    page.fill("#f-train-lr", "0.001")
    page.fill("#overrides", "")
    page.get_by_test_id("config-valid").wait_for()
    assert "train:\n  lr: 0.001" in page.locator("#yaml-preview").inner_text()
    assert_fits_width(page)


def test_data_page_shows_the_sequences_training_sees(world, page):
    from tunelab.config import load_config
    from tunelab.data.templates import IGNORE_INDEX
    from tunelab.data.tokenize import prepare_data
    from tunelab.models.load import load_tokenizer, stop_token_ids

    a = world["runs"]["a"]
    config = load_config(a["config"])
    tokenizer = load_tokenizer(config.model.path)
    data = prepare_data(config.data, "conversations", config.train.seed, tokenizer,
                        stop_token_ids(config.model.path, tokenizer))
    goto(page, f"{world['url']}/#/data?config={a['config']}")
    page.locator(".example").first.wait_for(timeout=120_000)
    first = page.locator(".example").first
    row = data.train[0]
    assert first.get_by_test_id("tokens").inner_text() == str(len(row["input_ids"]))
    assert first.get_by_test_id("trained-tokens").inner_text() == str(sum(1 for x in row["labels"] if x != IGNORE_INDEX))
    assert first.locator(".tokens").inner_text() == tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    trained = "".join(first.locator("mark.trained").all_inner_texts())
    assert trained and trained in tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    report = data.train_report
    assert page.get_by_test_id("total-tokens").get_attribute("data-value") == str(report.tokens)
    assert page.get_by_test_id("total-trained").get_attribute("data-value") == str(report.trained_tokens)
    assert report.lines()[0] in page.locator("#data-report").inner_text()
    assert int(page.locator("figure.chart svg").first.get_attribute("data-points")) > 0  # the length histogram
    assert_fits_width(page)


def test_evaluate_and_compare_pages_show_the_result_files(world, page):
    a = world["runs"]["a"]
    results = json.loads((a["eval"] / "results.json").read_text())
    eval_id = json.loads((a["eval"] / "run.json").read_text())["run_id"]
    goto(page, f"{world['url']}/#/evaluate?eval={eval_id}")
    value = page.get_by_test_id("eval-eval-chrf")
    assert float(value.get_attribute("data-value")) == results["metrics"]["chrf"]
    assert shown_number(value.inner_text()) == pytest.approx(results["metrics"]["chrf"], rel=5e-4, abs=1e-9)
    predictions = read_jsonl(a["eval"] / "predictions.jsonl")
    assert page.get_by_test_id("prediction-count").inner_text().startswith(f"{len(predictions)} predictions")
    page.fill("#prediction-search", predictions[2]["prompt"][:40])
    wait_until(lambda: page.get_by_test_id("prediction-count").inner_text().startswith("1 predictions"), 10,
               what="the search")
    assert_fits_width(page)

    goto(page, f"{world['url']}/#/evaluate?compare={world['compare']}")
    pair = world["compare_results"]["pairs"][0]
    win = page.get_by_test_id("win-rate-a-b")
    assert float(win.get_attribute("data-value")) == pair["win_rate"]
    assert f"{pair['wins']}" in page.locator("#pairs tbody tr").inner_text()
    assert_fits_width(page)


def test_playground_streams_an_answer_and_saves_a_judgement(world, page):
    from tunelab.eval.compare import run_compare

    a, b = (world["runs"][k]["out"] / "final" for k in ("a", "b"))
    goto(page, f"{world['url']}/#/playground?model={a}&model_b={b}")
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "What is 2 + 3?")
    page.keyboard.press("Control+Enter")
    answers = page.locator(".message.assistant")
    wait_until(lambda: page.locator("#judge-a").count(), 120, 0.1, "both answers")
    streamed = answers.all_inner_texts()
    assert all(text.strip() for text in streamed), streamed
    # The same model answered through its serve app without streaming: the same greedy text.
    loaded = page.evaluate("fetch('/api/playground/models').then(r => r.json())")["loaded"]
    key = next(m["key"] for m in loaded if m["path"] == str(a.resolve()))
    name = next(m["name"] for m in loaded if m["path"] == str(a.resolve()))
    whole = page.request.post(f"{world['url']}/api/playground/m/{key}/v1/chat/completions",
                              headers={"X-Tunelab-UI": "1"},
                              data={"model": name, "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                                    "max_tokens": 12, "temperature": 0, "seed": 0}).json()
    assert whole["choices"][0]["message"]["content"] == streamed[0]
    page.click("#judge-a")
    saved = page.get_by_test_id("label-saved").inner_text()
    labels = world["settings"].state_dir / "playground" / "labels.jsonl"
    row = read_jsonl(labels)[-1]
    assert row["winner"] == row["model_a"] and str(labels) in saved
    predictions = world["settings"].state_dir / "playground" / "predictions"
    results = run_compare([f"{row['model_a']}={predictions / (row['model_a'] + '.jsonl')}",
                           f"{row['model_b']}={predictions / (row['model_b'] + '.jsonl')}"], "labels",
                          world["tmp"] / "labels-compare", labels_path=str(labels), resamples=100)
    assert results["pairs"][0]["wins"] == 1 and results["pairs"][0]["win_rate"] == 1.0
    assert_fits_width(page)


def test_monitor_page_numbers_equal_the_monitor_report(world, page):
    report = world["report"]
    goto(page, f"{world['url']}/#/monitor?db={world['db']}")
    page.get_by_test_id("p99").wait_for()
    for testid, key in (("requests", "requests"), ("failed", "failed"), ("p50", "latency_p50_s"),
                        ("p95", "latency_p95_s"), ("p99", "latency_p99_s"), ("prompt-tokens", "prompt_tokens"),
                        ("completion-tokens", "completion_tokens")):
        assert float(page.get_by_test_id(testid).get_attribute("data-value")) == report[key], testid
    assert report["latency_p99_s"] > report["latency_p95_s"]
    assert "latency_p95 1.6 s is far above" in page.locator("#alerts").inner_text()
    assert "input_length" in page.locator("#drift").inner_text()
    throughput = page.locator("figure.chart svg").first
    assert int(throughput.get_attribute("data-points")) == len(report["bucket_start"])
    assert_fits_width(page)


def test_bad_input_gives_a_readable_message_and_the_server_keeps_serving(world, page, tmp_path):
    from tunelab.track.record import Artifact, record_run

    # A run whose directory was deleted after it was registered.
    gone = tmp_path / "gone"
    gone.mkdir()
    info = record_run("train", gone / "run.json", inputs=[Artifact("dataset", str(ARITHMETIC_TRAIN))],
                      outputs=[Artifact("adapter", str(gone / "final"))], metrics={"eval_loss": 1.5},
                      registry=world["registry"])
    shutil.rmtree(gone)
    goto(page, f"{world['url']}/#/run/{info['run_id']}")
    assert "no longer exists" in page.locator(".notice.warning").first.inner_text()
    assert page.get_by_test_id("metric-eval_loss").get_attribute("data-value") == "1.5"
    goto(page, f"{world['url']}/#/run/train-nosuchrun")
    assert "no run 'train-nosuchrun'" in page.locator("#error").inner_text()
    goto(page, f"{world['url']}/#/evaluate?compare={tmp_path / 'nothing'}")
    assert "no compare results" in page.locator("#error").inner_text()

    # A missing registry and a corrupt one, each behind its own UI.
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    for path, message in ((tmp_path / "missing.db", "no run registry at"), (corrupt, "corrupt")):
        settings = UISettings(registry=path, state_dir=tmp_path / "state", workdir=tmp_path)
        with ui_server(settings) as url:
            goto(page, f"{url}/#/runs")
            assert message in page.locator("main, #error").all_inner_texts().__str__()
            goto(page, f"{url}/#/launch")  # the server still serves
            assert page.locator("#config-path").is_visible()
    assert not (tmp_path / "missing.db").exists()  # reading never creates a registry
    goto(page, f"{world['url']}/#/runs")  # and the main UI is unaffected
    assert page.locator("#runs-table").is_visible()
