"""Bad input: every case of tests/support/bad_inputs.py through the CLI, and bad data files through the API.

The CLI suite runs each case in this process (``tunelab.cli.main``) and checks the exit code, the
message, that no traceback escaped, and that nothing was lost: every file the workspace held is
still there byte for byte (unless the case says what may change) and a failed command left no new
file, no temporary and no lock behind. Its totals are printed at the end of the test run.

With ``on_error: skip`` bad records are dropped, counted by reason with the first place each
happened, and training runs on the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bad_inputs import CASES as CLI_CASES
from bad_inputs import GOOD_ROWS, Fixtures, Workspace, jsonl, run_main
from conftest import make_config
from tunelab.data.readers import load_records
from tunelab.errors import DataError

SKIP_HINT = "(set data.on_error: skip"


GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}


@dataclass
class Case:
    """One bad file: its name and bytes, the line the error must name (None: no line applies), the message."""

    name: str
    content: bytes | None  # None: the file does not exist
    line: int | None
    message: str
    record_level: bool = False  # a bad record (skippable), not an unreadable file


CASES = {
    "jsonl_malformed_line": Case(
        "bad.jsonl",
        (jsonl(GOOD, GOOD) + '{"instruction": "x", "output": oops}\n' + jsonl(GOOD, GOOD)).encode(),
        3,
        "invalid JSON at column 32: Expecting value",
        record_level=True,
    ),
    "json_array_syntax_error": Case(
        "bad.json",
        b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"}\n  {"instruction": "e"}\n]\n',
        4,
        "invalid JSON at column 3: Expecting ',' delimiter",
    ),
    "alpaca_missing_output": Case(
        "alpaca.jsonl", jsonl(GOOD, {"instruction": "No answer here."}, GOOD).encode(), 2,
        "record has no 'output' field", record_level=True,
    ),
    "empty_file": Case("empty.jsonl", b"", None, "no records (the file is empty"),
    "only_blank_lines": Case("blank.jsonl", b"\n   \n\t\n\n", None, "no records (the file is empty or holds only blank lines"),
    "latin1_bytes": Case(
        "latin1.jsonl", jsonl(GOOD).encode() + '{"instruction": "Café?", "output": "Oui."}\n'.encode("latin-1"), 2,
        "not UTF-8 text (byte 0xe9 at byte 21 of the line); re-encode the file as UTF-8",
        record_level=True,
    ),
    "unknown_sharegpt_speaker": Case(
        "speaker.json",
        json.dumps([
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]},
        ], indent=2).encode(),
        14,  # the line where the second array element starts
        "unknown speaker 'robot' (expected one of assistant, bot,",
        record_level=True,
    ),
    "no_assistant_message": Case(
        "noassistant.jsonl",
        jsonl(
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"conversations": [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "Hi"}]},
        ).encode(),
        2,
        "conversation has no assistant message",
        record_level=True,
    ),
    "missing_file": Case("nowhere.jsonl", None, None, "data file not found"),
    "unsupported_extension": Case(
        "data.xml", b"<data/>\n", None, "unsupported file type '.xml'; use one of .csv, .json, .jsonl, .parquet, .txt"
    ),
    "csv_wrong_field_count": Case(
        "rows.csv", b"instruction,output\nSay hi.,Hi!\nAdd 2 and 3.,5,extra\nSay bye.,Bye!\n", 3,
        "3 fields where the header has 2",
        record_level=True,
    ),
}


def write_case(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / case.name
    if case.content is not None:
        path.write_bytes(case.content)
    return path


def expected_prefix(path: Path, case: Case) -> str:
    return f"{path}:{case.line}: " if case.line is not None else f"{path}: "


@pytest.mark.parametrize("case_id", list(CASES))
def test_load_records_names_file_and_line(tmp_path: Path, case_id: str) -> None:
    case = CASES[case_id]
    path = write_case(tmp_path, case)
    with pytest.raises(DataError) as info:
        load_records([str(path)])
    message = str(info.value)
    assert message.startswith(expected_prefix(path, case) + case.message), message
    # The skip hint only where skipping would help (a bad record, not an unreadable file).
    assert (SKIP_HINT in message) == case.record_level


def test_jsonl_error_reports_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "two_bad.jsonl"
    path.write_text(jsonl(GOOD) + "{not json}\n" + jsonl(GOOD) + "{also: bad}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        load_records([str(path)])


def test_non_utf8_in_txt_and_csv(tmp_path: Path) -> None:
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"fine line\nna\xefve line\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(txt))}:2: not UTF-8 text \(byte 0xef at byte 3 of the line\)"):
        load_records([str(txt)])
    csv_file = tmp_path / "c.csv"
    csv_file.write_bytes(b"text\nok\nok\n\xff\xfe\n")
    # A CSV cannot be read around a bad line (quotes may span lines): it stops even with skip.
    with pytest.raises(DataError, match=rf"^{re.escape(str(csv_file))}:4: not UTF-8 text \(byte 0xff at byte 1 of the line\)"):
        load_records([str(csv_file)], on_error="skip")


def test_directory_is_not_a_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: is a directory; name the data file\(s\) inside it"):
        load_records([str(tmp_path)])


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: cannot read Parquet"):
        load_records([str(path)])


def test_error_in_second_file_names_that_file(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(jsonl(GOOD, GOOD))
    bad = write_case(tmp_path, CASES["alpaca_missing_output"])
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}:2: record has no 'output' field"):
        load_records([str(good), str(bad)])


# --- on_error: skip -----------------------------------------------------------------------------

MIXED_ROWS = [
    GOOD,                                              # line 1
    {"instruction": "No answer."},                     # line 2: no output
    {"instruction": "Empty answer.", "output": "  "},  # line 3: assistant message is empty
    {"instruction": "Add 1 and 1.", "output": "2"},    # line 4
    {"instruction": "Another, no answer."},            # line 5: no output
    {"instruction": "", "input": "", "output": "x"},   # line 6: nothing to ask
    {"instruction": "Add 2 and 2.", "output": "4"},    # line 7
]


def test_skip_drops_and_counts_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl(*MIXED_ROWS))
    records, report = load_records([str(path)], on_error="skip")
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4", f"{path}:7"]
    assert (report.read, report.kept) == (7, 3)
    assert report.skipped == {
        "record has no 'output' field": 2,
        "assistant message is empty": 1,
        "'instruction' and 'input' are both empty": 1,
    }
    assert report.examples == {
        "record has no 'output' field": f"{path}:2",
        "assistant message is empty": f"{path}:3",
        "'instruction' and 'input' are both empty": f"{path}:6",
    }
    lines = report.summary().splitlines()
    assert lines[0] == f"2 skipped: record has no 'output' field (first at {path}:2)"
    assert sorted(lines[1:]) == [
        f"1 skipped: 'instruction' and 'input' are both empty (first at {path}:6)",
        f"1 skipped: assistant message is empty (first at {path}:3)",
    ]


def test_skip_counts_across_files_keep_the_first_place(tmp_path: Path) -> None:
    first = write_case(tmp_path, CASES["no_assistant_message"])
    second = tmp_path / "more.jsonl"
    second.write_text(jsonl(
        {"conversations": [{"from": "human", "value": "Hi"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "alien", "value": "?"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ))
    records, report = load_records([str(first), str(second)], on_error="skip")
    assert [r.source for r in records] == [f"{first}:1", f"{second}:3"]
    assert report.skipped["conversation has no assistant message"] == 2
    assert report.examples["conversation has no assistant message"] == f"{first}:2"
    unknown = [reason for reason in report.skipped if reason.startswith("unknown speaker 'alien'")]
    assert len(unknown) == 1 and report.examples[unknown[0]] == f"{second}:2"


def test_skip_when_every_record_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "allbad.jsonl"
    path.write_text(jsonl({"instruction": "a"}, {"instruction": "b"}, {"instruction": "c", "output": ""}))
    with pytest.raises(DataError) as info:
        load_records([str(path)], on_error="skip")
    assert str(info.value) == (
        f"{path}: no usable records\n"
        f"2 skipped: record has no 'output' field (first at {path}:1)\n"
        f"1 skipped: assistant message is empty (first at {path}:3)"
    )


@pytest.mark.parametrize("case_id", ["jsonl_malformed_line", "latin1_bytes", "csv_wrong_field_count"])
def test_skip_drops_unreadable_lines_and_counts_them(tmp_path: Path, case_id: str) -> None:
    """A line that cannot be read (truncated JSONL, bad bytes, a wrong CSV row) is one bad record."""
    case = CASES[case_id]
    path = write_case(tmp_path, case)
    records, report = load_records([str(path)], on_error="skip")
    assert case.line not in [int(r.source.rsplit(":", 1)[1]) for r in records]
    assert report.kept == len(records) >= 1
    assert list(report.skipped.values()) == [1]
    assert list(report.examples.values()) == [f"{path}:{case.line}"]
    assert next(iter(report.skipped)).startswith(case.message)


def test_skip_does_not_hide_a_broken_json_array(tmp_path: Path) -> None:
    """A JSON array with a syntax error cannot be split into records: it stops even with skip."""
    case = CASES["json_array_syntax_error"]
    path = write_case(tmp_path, case)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{case.line}: "):
        load_records([str(path)], on_error="skip")


# --- the CLI suite ------------------------------------------------------------------------------

OUTCOMES: dict[str, dict[str, bool]] = {}  # per case: traceback, lost, wrong (read by summary_line)


def summary_line() -> str | None:
    """The suite's totals for the end of the test run (conftest prints it), or None when it did not run."""
    if not OUTCOMES:
        return None
    count = lambda key: sum(outcome[key] for outcome in OUTCOMES.values())  # noqa: E731
    return (f"bad-input suite: {len(OUTCOMES)} cases through the CLI, {count('traceback')} tracebacks, "
            f"{count('wrong')} wrong or silent results, {count('lost')} losses of user data")


@pytest.fixture(scope="module")
def fixtures(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    """The tiny model, one of another size, and a finished LoRA run (checkpoints step-2, step-4, final/)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.config import config_from_dict
    from tunelab.train.engine import train

    root = tmp_path_factory.mktemp("bad-input-fixtures")
    other = root / "other-model"
    shutil.copytree(tiny_model, other)
    config = AutoConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 32, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    data = root / "data.jsonl"
    data.write_text(jsonl(*GOOD_ROWS))
    run = make_config(root, tiny_model, data, data={"max_length": 64},
                      train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 2, "lr": 1e-3, "batch_tokens": 256,
                             "log_every": 1, "seed": 0, "precision": "fp32"}, output_dir=str(root / "run"))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        train(config_from_dict(run))
    return Fixtures(tiny_model, other, root / "run")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not spin against other work on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (relative path -> SHA-256)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _allowed(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == prefix.rstrip("/") or path.startswith(prefix) for prefix in prefixes)


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input(name: str, fixtures: Fixtures, tmp_path: Path) -> None:
    case = CLI_CASES[name]
    if case.cpu_only:
        import torch

        if torch.cuda.is_available():
            pytest.skip("expects a machine without a GPU")
    root = Path(tempfile.mkdtemp(prefix=f"tunelab-{name}-")) if case.world_readable else tmp_path / "w"
    root.mkdir(exist_ok=True)
    w = Workspace(root, fixtures)
    try:
        if case.setup is not None:
            case.setup(w)
        argv = case.argv(w)
        before = snapshot(root)
        with case.context(w) if case.context else contextlib.nullcontext():
            code, output, trace = run_main(argv)
        after = snapshot(root)
        lost = [p for p, digest in before.items() if after.get(p) != digest and not _allowed(p, case.may_change)]
        left = [p for p in after if p not in before and not _allowed(p, case.may_change) and code != 0]
        litter = [p for p in after if ".tmp-" in p or p.endswith(".tunelab.lock") and p not in before]
        expected = [text.format(w=w) for text in case.says]
        missing = [text for text in expected if text not in output]
        OUTCOMES[name] = {"traceback": trace is not None or "Traceback (most recent call last)" in output,
                          "lost": bool(lost), "wrong": code != case.code or bool(missing) or bool(left or litter)}
        assert trace is None, trace
        assert "Traceback (most recent call last)" not in output, output
        assert code == case.code, f"exit {code}, expected {case.code}:\n{output[-3000:]}"
        assert not missing, f"missing {missing} in:\n{output[-3000:]}"
        assert not lost, f"changed or deleted: {lost}"
        assert not left, f"a failed command left files behind: {left}"
        assert not litter, f"temporaries or a lock left behind: {litter}"
        if case.check is not None:
            try:
                case.check(w, output)
            except AssertionError:
                OUTCOMES[name]["wrong"] = True
                raise
    finally:
        for cleanup in w.cleanups:
            cleanup()
        if case.world_readable:
            shutil.rmtree(root, ignore_errors=True)


def test_the_suite_is_large_enough() -> None:
    assert len(CLI_CASES) >= 80
